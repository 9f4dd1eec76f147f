"""Hugging Face datasets and torchvision front ends on real LFW images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import featdeid
from featdeid.transforms import DatasetTransform

from conftest import require_asset


@pytest.fixture(scope="module")
def lfw_files():
    root = require_asset("faces", "lfw_pairs150", "images")
    files = sorted(root.rglob("*.jpg"))[:16]
    assert len(files) == 16
    return files


@pytest.fixture(scope="module")
def lfw_dataset(lfw_files):
    import datasets

    return datasets.Dataset.from_dict({"image": [str(p) for p in lfw_files], "name": [p.parent.name for p in lfw_files]}).cast_column(
        "image", datasets.Image()
    )


def test_dataset_map_batched(lfw_dataset, random_model):
    fn = featdeid.transform_for("image", model=random_model, detector="dlib", seed=0)
    out = lfw_dataset.map(fn, batched=True, batch_size=4)
    assert out.num_rows == 16 and "num_faces" in out.column_names and out["name"] == lfw_dataset["name"]
    counts = out["num_faces"]
    assert sum(c >= 1 for c in counts) >= 12
    for i, c in enumerate(counts):
        a, b = np.asarray(lfw_dataset[i]["image"]), np.asarray(out[i]["image"])
        assert a.shape == b.shape
        assert (not np.array_equal(a, b)) == (c > 0)


NUM_PROC_SCRIPT = """
import sys, numpy as np, datasets, featdeid
files, model = sys.argv[1].split("|"), sys.argv[2]
ds = datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())
fn = featdeid.transform_for("image", model=model, detector="dlib", seed=0)
two = ds.map(fn, batched=True, batch_size=4, num_proc=2)
one = ds.map(fn, batched=True, batch_size=4)
same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(one["image"], two["image"]))
print(sum(c >= 1 for c in two["num_faces"]), same, two["num_faces"] == one["num_faces"])
"""


def test_dataset_map_num_proc_2(lfw_files, random_model, tmp_path):
    """num_proc=2 as a user's script runs it: a fresh process (forking a long-lived test process that
    holds other libraries' threads can deadlock inside those libraries, not in featdeid)."""
    model_dir = random_model.save_pretrained(tmp_path / "model")
    r = subprocess.run(
        [sys.executable, "-c", NUM_PROC_SCRIPT, "|".join(str(p) for p in lfw_files), str(model_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    changed, same, counts_equal = r.stdout.split()[-3:]
    assert int(changed) >= 12 and same == "True" and counts_equal == "True"


def test_default_transform_uses_image_column(lfw_dataset, random_model):
    t = DatasetTransform(model=random_model, detector="dlib")
    row = t({"image": lfw_dataset[0]["image"]})
    assert isinstance(row["image"], Image.Image) and row["num_faces"] == 1
    with pytest.raises(featdeid.ConfigError):
        t({"photo": [lfw_dataset[0]["image"]]})


def test_torchvision_v2_compose(lfw_files, random_model):
    from torchvision.transforms import v2

    pil = Image.open(lfw_files[0]).convert("RGB")
    pipeline = v2.Compose([featdeid.DeIdentify(model=random_model, detector="dlib", seed=0), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    x = pipeline(pil)
    assert x.shape == (3, 150, 150)
    ref = torch.from_numpy(np.asarray(featdeid.deidentify(pil, model=random_model, detector="dlib", seed=0))).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, ref)
    from torchvision import tv_tensors

    img = tv_tensors.Image(torch.from_numpy(np.asarray(pil)).permute(2, 0, 1))
    out = v2.Compose([featdeid.DeIdentify(model=random_model, detector="dlib", seed=0), v2.RandomHorizontalFlip(p=0.0)])(img)
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8 and not torch.equal(out, img)
