"""The packaged CenterFace detector on real photos: recall on the bbt40 group photos and their hard
variants, tiling of large photos, landmarks of tilted faces, scores in reports, broken weight files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featdeid import bench_detect as bd
from featdeid.errors import ConfigError, UnsafeWeightsError
from featdeid.faces import passes
from featdeid.faces.centerface import WEIGHTS, CenterFaceDetector
from featdeid.faces.detect import detect_faces, faces_from_user, get_detector

from conftest import REPO, require_asset


@pytest.fixture(scope="module")
def truth() -> list[bd.Photo]:
    """The hand-checked bbt40 group photos as benchmark photos (ONet reference landmarks)."""
    from featdeid.faces.onet import onet_landmarks

    root = require_asset("faces", "bbt40", "group_photos")
    out = []
    for name, known in json.loads(bd.TRUTH.read_text())["photos"].items():
        rgb = np.asarray(Image.open(root / name).convert("RGB"))
        boxes = np.array([k["box"] for k in known])
        out.append(bd.Photo(name, rgb, boxes, onet_landmarks(rgb, boxes), True, "group"))
    return out


def _found(photo: bd.Photo, **kw) -> tuple[int, int]:
    hit, spurious, _ = bd.match(detect_faces(photo.rgb, "centerface", **kw), photo.boxes)
    return int(hit.sum()), spurious


def test_every_group_face_is_found_with_few_false_positives(truth):
    found = [_found(p) for p in truth]
    assert sum(f for f, _ in found) == sum(len(p.boxes) for p in truth) == 23
    assert sum(s for _, s in found) <= 1  # at most 1 false positive over the 5 photos


@pytest.mark.parametrize("name", ["dark", "rot30", "mask"])
def test_hard_variants_of_group_photos(truth, name):
    photos = [bd.variant(p, name, i) for i, p in enumerate(truth)]
    found = sum(_found(p)[0] for p in photos)
    assert found >= 22, f"{name}: {found} of 23 faces"


def test_thorough_finds_strongly_rotated_faces(truth):
    photos = [bd.variant(p, "rot60", i) for i, p in enumerate(truth[2:4])]  # bbt3, bbt4: 11 faces
    plain = sum(_found(p)[0] for p in photos)
    thorough = sum(_found(p, thorough=True)[0] for p in photos)
    assert thorough == 11 and thorough >= plain


def test_tilted_faces_get_upright_landmarks(truth):
    """Landmarks found on a photo rotated 45 degrees, mapped back, agree with those on the original."""
    photo = truth[2]
    tilted = bd.rotate(photo, 45)
    inv = np.linalg.inv(np.vstack([passes.rotated(photo.rgb, 45)[1], [0, 0, 1]]))  # original -> canvas
    ref = detect_faces(photo.rgb, "centerface")
    got = detect_faces(tilted.rgb, "centerface")
    assert len(got) == len(ref) == 5
    for f in ref:
        lm = f.landmarks @ inv[:2, :2].T + inv[:2, 2]
        nearest = min(got, key=lambda g: float(np.linalg.norm(g.landmarks.mean(0) - lm.mean(0))))
        iod = float(np.linalg.norm(lm[1] - lm[0]))
        err = float(np.linalg.norm(nearest.landmarks - lm, axis=1).mean()) / iod
        assert err < 0.12, err
        want = float(np.degrees(np.arctan2(*(lm[1] - lm[0])[::-1])))
        assert abs(passes.roll(nearest) - want) < 12 and abs(want) > 30  # eye order kept: tilted by 45, not 225


def test_large_photo_is_searched_in_tiles(truth, monkeypatch):
    """Small faces on a 5200 x 3400 photo vanish in the 1280 px overview; the tiles find them."""
    photo = truth[2]
    small = bd.small(photo, 28)
    canvas = np.full((3400, 5200, 3), 120, np.uint8)
    h, w = small.rgb.shape[:2]
    canvas[1500 : 1500 + h, 3000 : 3000 + w] = small.rgb
    boxes = small.boxes + np.array([3000, 1500, 3000, 1500])
    hit, _, _ = bd.match(detect_faces(canvas, "centerface"), boxes)
    assert hit.all()
    monkeypatch.setattr(passes, "TILE_SCALE", 0.0)
    hit_without, _, _ = bd.match(detect_faces(canvas, "centerface"), boxes)
    assert hit_without.sum() < len(boxes)


def test_user_boxes_get_landmarks_from_the_cnn(truth):
    photo = truth[0]
    faces = faces_from_user([{"box": b} for b in photo.boxes], photo.rgb, "centerface")
    for f, ref in zip(faces, photo.landmarks):
        assert bd.landmark_error(f, ref) < 0.2
    with pytest.raises(ConfigError, match="no face found"):
        faces_from_user([{"box": [0, 0, 40, 40]}], np.full((200, 200, 3), 90, np.uint8), "centerface")


def test_scores_and_min_score_in_the_report(random_model, truth):
    import featdeid

    img = Image.fromarray(truth[3].rgb)
    out, rep = featdeid.deidentify(img, model=random_model, seed=0, return_report=True)
    d = rep.to_dict()
    assert d["changed"] == 6 and all(0 < f["score"] <= 1 and f["low_confidence"] is False for f in d["details"])
    keep, rep2 = featdeid.deidentify(img, model=random_model, seed=0, min_score=0.999, return_report=True)
    assert rep2.changed == 0 and rep2.skipped == 6 and {f.status for f in rep2.faces} == {"below_min_score"}
    assert np.array_equal(np.asarray(keep), truth[3].rgb)
    with pytest.raises(ConfigError):
        featdeid.Deidentifier(random_model, min_score="high")


def test_weak_detections_need_onets_agreement(truth, monkeypatch):
    """bbt2's back of a head scores about 0.24 with CenterFace; ONet, shown it upright, says no face."""
    photo = truth[1]
    head = np.array([565, 82, 590, 129])
    def near_head(faces):
        return [f for f in faces if np.abs(f.box - head).max() < 15]
    assert not near_head(detect_faces(photo.rgb, "centerface"))
    monkeypatch.setattr(passes, "VERIFY_MIN_PROB", 0.0)
    weak = near_head(detect_faces(photo.rgb, "centerface"))
    assert weak and weak[0].score < get_detector("centerface").confident


def test_low_confidence_detections_are_changed_and_flagged(random_model, truth):
    """Faces a detector is unsure of are still de-identified, and flagged in the report."""
    import featdeid
    from featdeid.faces.detect import Face

    class Unsure:
        name, confident = "unsure", 0.5

        def detect(self, rgb):
            return [Face(f.box, f.landmarks, f.score * 0.4) for f in detect_faces(rgb, "centerface")]

    _, rep = featdeid.Deidentifier(random_model, detector=Unsure())(Image.fromarray(truth[3].rgb), seed=0, return_report=True)
    assert len(rep.faces) == 6 and rep.low_confidence == 6 and rep.changed == 6
    assert all(d["low_confidence"] and d["score"] < 0.5 for d in rep.to_dict()["details"])


def _broken(tmp_path, kind: str):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        path.write_bytes(WEIGHTS.read_bytes()[:1000])
    elif kind == "pickle":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"backbone.0.0.weight": torch.zeros(32, 3, 3, 3)}, str(path))
    return path


@pytest.mark.parametrize("kind", ["truncated", "pickle", "wrong_keys"])
def test_broken_weights_are_typed_errors(tmp_path, kind):
    with pytest.raises(UnsafeWeightsError):
        CenterFaceDetector(weights=_broken(tmp_path, kind))


def test_plain_install_needs_no_dlib(tmp_path):
    """With dlib unimportable, the default detector still loads (no network) and finds the faces."""
    photo = require_asset("faces", "bbt40", "group_photos", "bbt3.jpg")
    code = (
        "import sys; sys.modules['dlib'] = None; sys.modules['face_recognition_models'] = None\n"
        "import numpy as np; from PIL import Image; from featdeid.faces.detect import detect_faces, get_detector, available_detectors\n"
        f"faces = detect_faces(np.asarray(Image.open({str(photo)!r}).convert('RGB')))\n"
        "print(get_detector('auto').name, len(faces), available_detectors())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "INSIGHTFACE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["centerface", "5"]


def test_unknown_detector_is_a_config_error():
    with pytest.raises(ConfigError, match="centerface"):
        get_detector("hog")


def test_bench_detect_writes_table_and_plot(tmp_path, assets):
    from featdeid.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "detect", "--assets", str(assets), "--celeba", "3", "--variants", "original,dark",
                 "--backends", "centerface", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["results"]["centerface"]
    assert res["variants"]["original"]["faces"] == 23 + 3 and res["variants"]["crops"]["faces"] == 40
    assert res["total"]["recall"] > 0.95 and res["variants"]["original"]["landmark_error_median"] < 0.15
    assert (out / "recall.png").stat().st_size > 1000 and "| centerface |" in (out / "table.md").read_text()
