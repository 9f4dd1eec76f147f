"""Integrations: ComfyUI node, GIMP / darktable / digiKam command contract, Ray Data, README examples."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, require_asset

INTEGRATIONS = REPO / "integrations"
BIN = Path(sys.executable).parent
FEATDEID = shutil.which("featdeid", path=str(BIN)) or shutil.which("featdeid")


def _group(name: str = "bbt4.jpg") -> Path:
    return require_asset("faces", "bbt40", "group_photos", name)


@pytest.fixture(scope="module")
def runner(random_model):
    import featdeid

    return featdeid.Deidentifier(random_model)


@pytest.fixture()
def cli_env(model_dir):
    """The environment the GIMP / darktable / digiKam hosts would give the command."""
    return {**os.environ, "FEATDEID_MODEL": str(model_dir), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _load_module(name: str, path: Path, package: bool = False):
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _faces_changed(out: np.ndarray, original: np.ndarray, boxes: list) -> None:
    """Same size; every face box changed; the bottom rows (far from every face's frame) bit-identical."""
    assert out.shape == original.shape
    diff = np.abs(out.astype(np.float64) - original.astype(np.float64))
    scale = 255.0 if original.dtype == np.uint8 else 1.0
    assert diff[-5:].max() == 0
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        assert diff[max(y0, 0):y1, max(x0, 0):x1].mean() * 255.0 / scale > 1.0


# -- ComfyUI ---------------------------------------------------------------------------------------
def test_comfyui_node(model_dir, runner):
    pack = _load_module("featdeid_comfyui_pack", INTEGRATIONS / "comfyui", package=True)  # as ComfyUI loads it
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    cls = pack.NODE_CLASS_MAPPINGS["FeatdeidDeidentify"]
    spec = cls.INPUT_TYPES()
    assert spec["required"]["image"] == ("IMAGE",) and spec["required"]["strength"][0] == "FLOAT"
    assert spec["required"]["seed"][0] == "INT" and cls.RETURN_TYPES == ("IMAGE", "INT")

    rgb = np.asarray(Image.open(_group()).convert("RGB"))
    frames = np.stack([rgb, rgb[:, ::-1]]).astype(np.float32) / 255.0  # a batch of two
    image = torch.from_numpy(frames)  # (B, H, W, C) float in [0, 1], as ComfyUI passes it
    inputs = {"image": image, "strength": 1.0, "seed": 3, "model": str(model_dir), "detector": "auto"}
    out, faces = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(out, torch.Tensor) and out.shape == image.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    _, report = runner(frames[0], strength=1.0, seed=3, return_report=True)
    assert faces == 2 * report.changed and report.changed >= 5
    _faces_changed(out[0].numpy(), frames[0], [f.face.box for f in report.faces])
    expected = runner(frames[1], strength=1.0, seed=3)
    assert np.abs(out[1].numpy() - expected).max() < 2 / 255

    same, none = getattr(cls(), cls.FUNCTION)(image=image, strength=0.0, seed=0, model=str(model_dir))
    assert none == 0 and torch.equal(same, image)


# -- the command contract of GIMP, darktable and digiKam -------------------------------------------
def _png_copy(tmp_path: Path, name: str = "photo.png") -> Path:
    src = tmp_path / name
    Image.open(_group()).convert("RGB").save(src)
    return src


def test_gimp_plugin_command(tmp_path, cli_env, monkeypatch, runner):
    script = INTEGRATIONS / "gimp" / "featdeid-gimp" / "featdeid-gimp.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "gimp.pyc"), doraise=True)
    assert os.access(script, os.X_OK)
    plugin = _load_module("featdeid_gimp_plugin", script)  # gi is imported only inside GIMP
    assert "gi" not in plugin.__dict__
    for k, v in cli_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FEATDEID_COMMAND", raising=False)

    src = _png_copy(tmp_path, "featdeid-input.png")
    work = tmp_path / "work"
    work.mkdir()
    cmd = plugin.build_command(str(src), str(work / "out"), str(work / "report.json"), 1.0, 5, None)
    assert cmd[1:] == [str(src), "-o", str(work / "out"), "--format", "png", "--lossless", "--overwrite", "--quiet",
                       "--report", str(work / "report.json"), "--strength", "1.0", "--seed", "5",
                       "--model", cli_env["FEATDEID_MODEL"]]
    assert Path(cmd[0]).name == "featdeid"
    out, record = plugin.run_featdeid(str(src), str(work), strength=1.0, seed=5)  # runs exactly `cmd`
    assert out == str(work / "out" / "featdeid-input.png") == plugin.output_path(str(src), str(work / "out"))
    result = Image.open(out)
    assert result.format == "PNG" and result.size == Image.open(src).size
    report = json.loads((work / "report.json").read_text())
    assert report["summary"]["ok"] == 1 and report["summary"]["failed"] == 0
    assert record["status"] == "ok" and record["faces"] >= 5 and record["changed"] == record["faces"]
    assert record["output"] == out and record["seed"] == 5
    original = np.asarray(Image.open(src))
    got = np.asarray(result.convert("RGB"))
    _faces_changed(got, original, [d["box"] for d in record["details"]])
    assert np.abs(got.astype(int) - runner(original, strength=1.0, seed=5).astype(int)).max() <= 2  # lossless
    assert plugin.layer_name(record).startswith(f"featdeid: {record['changed']} faces de-identified")

    broken = tmp_path / "broken.png"  # exit code 1: the report says why
    broken.write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="featdeid failed: .*broken.png"):
        plugin.run_featdeid(str(broken), str(tmp_path / "work2"))
    with pytest.raises(RuntimeError, match="featdeid failed"):  # exit code 2: usage error (no such model)
        plugin.run_featdeid(str(src), str(tmp_path / "work3"), model=str(tmp_path / "no-model"))
    r = subprocess.run(plugin.build_command(str(src), str(tmp_path / "o4"), str(tmp_path / "r4.json"), model=str(tmp_path / "x")),
                       capture_output=True, text=True, env=cli_env)
    assert r.returncode == 2 and "error" in r.stderr


def _lua() -> str | None:
    return shutil.which("lua5.4") or shutil.which("lua")


def test_darktable_script(tmp_path, cli_env):
    script = INTEGRATIONS / "darktable" / "featdeid.lua"
    luac = shutil.which("luac5.4") or shutil.which("luac")
    if not (luac and _lua()):
        msg = "lua5.4 not installed (apt-get install lua5.4)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    subprocess.run([luac, "-p", str(script)], check=True)
    exported = _png_copy(tmp_path, "IMG_0001.png")  # what darktable's export hands to the storage
    roll = tmp_path / "roll"
    roll.mkdir()
    harness = tmp_path / "harness.lua"
    harness.write_text(r"""
local registered, printed = {}, {}
package.preload["darktable"] = function()
  return {
    configuration = { running_os = "linux" },
    preferences = { register = function() end, read = function() return nil end },
    register_storage = function(name, label, store, finalize, supported) registered = { store = store, finalize = finalize, supported = supported } end,
    control = { execute = function(cmd) local ok, how, code = os.execute(cmd); return code end },
    print = function(msg) printed[#printed + 1] = msg end,
  }
end
package.path = arg[1] .. "/?.lua;" .. package.path
local M = require("featdeid")
assert(registered.supported(nil, { extension = "png" }) and not registered.supported(nil, { extension = "exr" }))
print("COMMAND " .. M.command("featdeid", arg[2], arg[3] .. "/featdeid", 1.0, os.getenv("FEATDEID_MODEL")))
local code = registered.store(nil, { path = arg[3], filename = "IMG_0001.CR2" }, { extension = "png" }, arg[2], 1, 1, true, nil)
registered.finalize(nil, {}, nil)
print("CODE " .. tostring(code))
for _, m in ipairs(printed) do print("PRINT " .. m) end
""")
    r = subprocess.run([_lua(), str(harness), str(script.parent), str(exported), str(roll)], capture_output=True, text=True,
                       env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    command = next(line[len("COMMAND "):] for line in lines if line.startswith("COMMAND "))
    assert command == (f"'featdeid' '{exported}' -o '{roll}/featdeid' --format png --lossless --overwrite --quiet "
                       f"--strength 1.000 --model '{cli_env['FEATDEID_MODEL']}'")
    assert "CODE 0" in lines
    out = roll / "featdeid" / "IMG_0001.png"
    assert Image.open(out).format == "PNG" and Image.open(out).size == (710, 473)
    assert not exported.exists()  # the temporary export is removed
    assert any("1 image(s) de-identified, 0 failed" in line for line in lines)


def _digikam_escape(path: Path) -> str:
    """digiKam puts file names into the script with special characters backslash-escaped."""
    return re.sub(r"([^A-Za-z0-9_./-])", r"\\\1", str(path))


def test_digikam_custom_script(tmp_path, cli_env):
    text = (INTEGRATIONS / "digikam" / "README.md").read_text()
    script = re.search(r"<!-- featdeid-digikam-script -->\n```bash\n(.*?)```", text, re.S).group(1)
    src = _png_copy(tmp_path, "My Photo (1).png")
    target = tmp_path / "queue out" / "My Photo (1)-bqm.png"
    target.parent.mkdir()
    filled = script.replace("$INPUT", _digikam_escape(src)).replace("$OUTPUT", _digikam_escape(target))
    r = subprocess.run(["bash", "-c", filled], capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = Image.open(target)
    assert out.format == "PNG" and out.size == Image.open(src).size
    assert not np.array_equal(np.asarray(out.convert("RGB")), np.asarray(Image.open(src)))

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image")
    filled = script.replace("$INPUT", _digikam_escape(bad)).replace("$OUTPUT", _digikam_escape(tmp_path / "bad-out.png"))
    r = subprocess.run(["bash", "-c", filled], capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 1 and not (tmp_path / "bad-out.png").exists() and '"status": "error"' in r.stderr


# -- Ray Data ----------------------------------------------------------------------------------------
def test_ray_batch_callable_without_ray(model_dir, runner):
    from featdeid.ray import DeIdentifyBatch

    rgb = np.asarray(Image.open(_group()).convert("RGB"))
    fn = DeIdentifyBatch(model=str(model_dir), seed=1)
    out = fn({"image": np.stack([rgb, rgb]), "id": np.array([1, 2])})  # fixed size: one (B, H, W, 3) array
    assert out["image"].shape == (2, *rgb.shape) and out["image"].dtype == np.uint8
    assert out["id"].tolist() == [1, 2] and out["num_faces"].tolist() == [6, 6]
    np.testing.assert_array_equal(out["image"][0], runner(rgb, seed=1))
    small = np.asarray(Image.open(_group("bbt3.jpg")).convert("RGB"))
    col = np.empty(2, dtype=object)
    col[0], col[1] = rgb, small
    out = fn({"image": col})  # variable sizes: object array
    assert out["image"].dtype == object and out["image"][1].shape == small.shape
    assert fn({"image": [small]})["image"][0].shape == small.shape  # list column
    import pandas as pd

    df = fn(pd.DataFrame({"image": [rgb, small]}))
    assert list(df["num_faces"]) == out["num_faces"].tolist()


def test_ray_map_batches(model_dir, runner):
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import featdeid.ray

    paths = [_group(n) for n in ("bbt2.jpg", "bbt3.jpg", "bbt4.jpg")]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # in-memory rows of different sizes (read_images would need a CPU beside the actor's one)
        ds = ray.data.from_items([{"image": np.asarray(Image.open(p).convert("RGB")), "path": str(p)} for p in paths])
        ds = ds.map_batches(featdeid.ray.DeIdentifyBatch, fn_constructor_kwargs={"model": str(model_dir), "seed": 0},
                            batch_size=2, concurrency=1)
        rows = sorted(ds.take_all(), key=lambda r: r["path"])
    finally:
        ray.shutdown()
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    for row, path in zip(rows, paths):
        original = np.asarray(Image.open(path).convert("RGB"))
        expected, report = runner(original, seed=0, return_report=True)
        assert row["image"].shape == original.shape and row["image"].dtype == np.uint8
        assert row["num_faces"] == report.changed > 0
        assert np.abs(row["image"].astype(int) - expected.astype(int)).max() <= 2


# -- README examples (datasets, torchvision) ----------------------------------------------------------
def test_integrations_readme_examples(model_dir, tmp_path):
    pytest.importorskip("datasets")
    text = (INTEGRATIONS / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    shutil.copy(_group("bbt4.jpg"), tmp_path / "group.jpg")
    shutil.copy(_group("bbt2.jpg"), tmp_path / "team.jpg")
    # the examples use the default model; point it at the test model for this process only
    prelude = ("import featdeid.loading, pathlib\n"
               f"featdeid.loading.default_model_path = lambda: pathlib.Path({str(model_dir)!r})\n")
    code = prelude + "\n".join(blocks)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "deidentified"))
    assert saved.column_names == ["image", "num_faces"] and list(saved["num_faces"]) == [6, 3]
    first = saved.with_format(None)[0]["image"]
    assert first.format == "PNG" and first.size == Image.open(tmp_path / "group.jpg").size
