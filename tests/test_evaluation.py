"""The evaluation harness: metrics, threshold selection, CMC, attacks, baselines, and real runs on LFW."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_asset

from featdeid import images
from featdeid.errors import ConfigError
from featdeid.evaluation import attacks as atk
from featdeid.evaluation.baselines import (
    AdversarialMethod,
    BlurMethod,
    FeatdeidMethod,
    PixelateMethod,
    SolidMaskMethod,
    parse_method,
)
from featdeid.evaluation.identification import cmc, identification, ranks
from featdeid.evaluation.metrics import LPIPSAlex, mean_psnr, psnr, ssim
from featdeid.evaluation.verification import (
    accuracy,
    attack_success_ratio,
    best_threshold,
    kfold_accuracy,
    roc_auc,
)
from featdeid.faces.paste import apply_mask, face_mask

REPO = Path(__file__).resolve().parents[1]
MFN = ("weights", "xiaoccer_mobilefacenet", "068.ckpt")
EN = ("weights", "faceplugin_fr_feature", "fr_feature.onnx")
FRAME = 128  # small frames keep the real runs fast; the protocol default is 256


# --- metrics -----------------------------------------------------------------------------------------
def _images(seed: int = 0, n: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round().to(torch.uint8)


def test_psnr_identical_is_inf_and_known_mse_gives_known_psnr():
    a = _images()
    assert np.isinf(psnr(a, a)).all()
    b = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    c = torch.full((1, 3, 8, 8), 10, dtype=torch.uint8)  # MSE = 100
    assert psnr(b, c)[0] == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)  # 28.1308 dB
    # float inputs in [0, 1] are on the same 8-bit scale
    assert psnr(b.float() / 255, c.float() / 255)[0] == pytest.approx(28.1308, abs=1e-4)
    # a single off-by-one pixel: MSE = 1 / (3 * 64)
    d = b.clone()
    d[0, 0, 0, 0] = 1
    assert psnr(b, d)[0] == pytest.approx(10 * math.log10(255**2 * 192), abs=1e-9)
    assert mean_psnr(np.array([np.inf, 20.0, 30.0])) == 25.0
    assert mean_psnr(np.array([np.inf, np.inf])) == math.inf


def test_ssim_identical_is_one_and_known_constant_images():
    a = _images(size=48)
    assert ssim(a, a) == pytest.approx([1.0, 1.0])
    # constant images: only the luminance term is left, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01 * 255)^2
    c1 = (0.01 * 255) ** 2
    x = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    y = torch.full((1, 3, 32, 32), 110, dtype=torch.uint8)
    assert ssim(x, y)[0] == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), abs=1e-9)
    noisy = (a.float() + torch.randn(a.shape, generator=torch.Generator().manual_seed(1)) * 30).clamp(0, 255).round().to(torch.uint8)
    assert (ssim(a, noisy) < 0.99).all()


@pytest.fixture(scope="module")
def lpips_alex():
    return LPIPSAlex(require_asset("weights", "imagenet_alexnet"))


def test_lpips_zero_for_identical_and_matches_reference_value(lpips_alex):
    a = _images(size=64)
    assert lpips_alex(a, a) == pytest.approx([0.0, 0.0], abs=1e-7)
    # reference from the assets' SOURCE.md: seed 123, (rand * 2 - 1) pairs drawn right after the seed -> 0.14856
    torch.manual_seed(123)
    x = torch.rand(10, 3, 100, 100)
    y = torch.rand(10, 3, 100, 100)
    assert lpips_alex(x, y).mean() == pytest.approx(0.14856, abs=2e-4)
    blurred = atk.gaussian_blur(a, 5, 2.0)
    assert (lpips_alex(a, blurred) > 0.01).all()


# --- verification ------------------------------------------------------------------------------------------
def test_best_threshold_on_hand_made_scores():
    scores = np.array([0.95, 0.9, 0.8, 0.6, 0.55, 0.3, 0.2, 0.1])
    same = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    thr, acc = best_threshold(scores, same)
    # the best cuts: between 0.8 and 0.6 or between 0.55 and 0.3 (7/8 correct); the wider gap wins
    assert acc == pytest.approx(7 / 8)
    assert thr == pytest.approx(0.425)
    assert accuracy(scores, same, thr) == pytest.approx(7 / 8)
    # ASR of the genuine scores at that threshold: none of 0.95, 0.9, 0.8, 0.55 is below
    assert attack_success_ratio(scores[same], thr) == 0.0
    assert attack_success_ratio(np.array([0.1, 0.5, 0.9]), 0.6) == pytest.approx(2 / 3)
    # perfectly separable -> accuracy 1, threshold strictly between the classes
    thr2, acc2 = best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool))
    assert acc2 == 1.0 and 0.2 < thr2 < 0.8
    # all genuine -> threshold below everything
    thr3, acc3 = best_threshold(np.array([0.3, 0.5]), np.array([1, 1], bool))
    assert acc3 == 1.0 and thr3 < 0.3
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    with pytest.raises(ValueError):
        best_threshold(np.array([]), np.array([], bool))


def test_kfold_accuracy_uses_held_out_folds():
    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 100)
    scores = np.where(same, rng.normal(0.7, 0.1, 200), rng.normal(0.2, 0.1, 200))
    folds = np.tile(np.arange(10), 20)
    mean, std = kfold_accuracy(scores, same, folds)
    assert 0.95 < mean <= 1.0 and std >= 0


# --- identification ---------------------------------------------------------------------------------------
def test_ranks_and_cmc_on_a_hand_made_similarity_matrix():
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # true 0: rank 1
            [0.8, 0.7, 0.9, 0.1],  # true 1: two higher -> rank 3
            [0.1, 0.2, 0.5, 0.5],  # true 2: tie with column 3 -> rank 1 (ties do not count)
            [0.9, 0.8, 0.7, 0.6],  # true 3: rank 4
        ]
    )
    r = ranks(sim, np.arange(4))
    assert r.tolist() == [1, 3, 1, 4]
    assert cmc(r, 4).tolist() == [0.5, 0.5, 0.75, 1.0]
    nan_row = sim.copy()
    nan_row[1] = np.nan
    assert ranks(nan_row, np.arange(4))[1] == np.inf


def test_identification_protocol_over_set_combinations():
    # 3 persons, 2 sets: unit embeddings, set 1 of person 2 looks like person 0
    e = np.eye(3)
    gallery = np.stack([e, e], axis=1)  # (P, K, D)
    queries = gallery.copy()
    queries[2, 1] = [1.0, 0.0, 0.0]
    out = identification(queries, gallery)
    assert out["combinations"] == [(0, 1), (1, 0)]
    assert out["queries"] == 6
    assert out["rank1"] == pytest.approx(5 / 6)  # only (input set 1 -> registered set 0) of person 2 fails
    assert out["per_combination_rank1"] == pytest.approx([1.0, 2 / 3])
    # a missing query embedding (face lost) never matches
    q2 = gallery.copy()
    q2[0, 0] = np.nan
    assert identification(q2, gallery)["rank1"] == pytest.approx(5 / 6)
    # an unusable original leaves that person out of the combinations using it
    valid = np.ones((3, 2), bool)
    valid[1, 0] = False
    assert identification(gallery, gallery, valid)["queries"] == 4


# --- attacks -----------------------------------------------------------------------------------------------
def test_attacks_keep_shape_and_dtype_and_do_what_they_say():
    x = _images(n=2, size=40)
    for name, fn in atk.ATTACKS.items():
        y = fn(x)
        assert y.shape == x.shape and y.dtype == torch.uint8, name
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(atk.gaussian_blur(flat), flat)
    assert torch.equal(atk.median_blur(flat), flat)
    levels = set(atk.bit_depth(x, 3).unique().tolist())
    assert levels <= {round(k * 255 / 7) for k in range(8)}
    assert not torch.equal(atk.jpeg(x, 10), x)
    with pytest.raises(ConfigError):
        atk.get_attacks("nope")
    with pytest.raises(ConfigError):
        atk.jpeg(x.float())
    assert list(atk.get_attacks("jpeg10,bits3")) == ["jpeg10", "bits3"]


# --- methods -------------------------------------------------------------------------------------------------
def test_baselines_change_only_the_face_mask():
    c = _images(n=2, size=64).float() / 255
    outside = face_mask(64)[0, 0] == 0
    for m in (BlurMethod(4), PixelateMethod(8), SolidMaskMethod()):
        d = m.apply(c, ["a", "b"])
        assert d.shape == c.shape and d.min() >= 0 and d.max() <= 1
        assert torch.equal(d[..., outside], c[..., outside]), m.name
        assert (d - c).abs().max() > 0.05, m.name
    grey = SolidMaskMethod().apply(c, ["a", "b"])
    centre = face_mask(64)[0, 0] == 1
    assert torch.allclose(grey[..., centre], torch.full_like(grey[..., centre], 0.5))


def test_parse_method_specs_and_errors():
    assert parse_method("blur@2").name == "blur@2"
    assert parse_method("pixelate@16").param == 16
    assert parse_method("mask").name == "mask"
    adv = parse_method("adv@4x10", adv_recogniser=lambda: None)
    assert (adv.eps, adv.steps, adv.alpha) == (4.0, 10, 0.4)
    for bad in ("warp@3", "blur@x", "blur@-1", "adv@4x10"):
        with pytest.raises(ConfigError):
            parse_method(bad)
    with pytest.raises(ConfigError):
        parse_method("featdeid@1")  # no model


def test_featdeid_method_matches_hide_and_apply_mask(random_model):
    from featdeid.pipeline import Deidentifier

    deid = Deidentifier(random_model, detector="dlib")
    s = random_model.image_size
    c = _images(n=3, size=s).float() / 255
    keys = ["x/1.jpg", "x/2.jpg", "y/1.jpg"]
    m = FeatdeidMethod(deid, 1.5, seed=3)
    d = m.apply(c, keys)
    expected = apply_mask(c, c + 1.5 * deid.hide(c, m.features(keys))).clamp(0, 1)
    assert torch.allclose(d, expected, atol=1e-6)
    assert m.identity_index("x/1.jpg") == FeatdeidMethod(deid, 1.0, seed=3).identity_index("x/1.jpg")
    assert torch.equal(FeatdeidMethod(deid, 0.0).apply(c, keys), c)
    # frames larger than the model: residual computed at the model's size, added at full size
    big = torch.nn.functional.interpolate(c, size=(2 * s, 2 * s), mode="bilinear", align_corners=False)
    d_big = m.apply(big, keys)
    assert d_big.shape == big.shape and not torch.equal(d_big, big)


def test_adversarial_baseline_respects_budget_and_lowers_similarity():
    from featdeid.recognisers import load_recogniser

    rec = load_recogniser(f"onnx:{require_asset(*EN)}")
    imgs = sorted(require_asset("faces", "bbt40", "images").glob("*.png"))[:2]
    from featdeid.faces.align import align

    covers = torch.cat([align(p, 128, "dlib", largest=True)[0] for p in imgs])
    m = AdversarialMethod(8, 5, rec, batch_size=2)
    d = m.apply(covers, [p.name for p in imgs])
    delta = d - covers
    assert delta.abs().max() <= 8 / 255 + 1e-6
    assert torch.equal(d[..., face_mask(128)[0, 0] == 0], covers[..., face_mask(128)[0, 0] == 0])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(rec.embed(covers), rec.embed(d)).tolist()
    assert max(cos) < 0.9, cos


# --- real runs on LFW -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def lfw_sanity(tmp_path_factory, eval_cache):
    """60 genuine + 60 impostor LFW pairs and 20 persons for 1:N, MobileFaceNet, identity and shuffle."""
    from featdeid.evaluation import EvalConfig, evaluate

    assets = require_asset()
    require_asset("faces", "lfw_pairs150", "pairs.txt")
    cfg = EvalConfig(
        assets=assets,
        out=tmp_path_factory.mktemp("lfw-sanity"),
        evaluators=[f"mobilefacenet:{require_asset(*MFN)}"],
        methods=["identity", "shuffle"],
        limit=60,
        persons=20,
        frame_size=FRAME,
        cache_dir=eval_cache,
        examples=2,
        progress=False,
        workers=0,
    )
    return cfg, evaluate(cfg)


def test_lfw_subset_identity_equals_originals_and_shuffle_is_near_one(lfw_sanity):
    cfg, res = lfw_sanity
    s = res["set"]
    assert s["genuine_pairs"] == 60 and s["impostor_pairs"] == 60 and s["onen_persons"] == 20
    ev = res["evaluators"][0]
    assert ev["accuracy"] > 0.9  # MobileFaceNet on 120 LFW pairs of originals
    methods = {m["name"]: m for m in res["methods"]}
    ident = methods["identity"]["evaluators"][ev["name"]]
    assert ident["asr"] == ev["asr_original"]
    assert ident["rank1"] == ev["rank1_original"]
    q = methods["identity"]["quality"]
    assert q["psnr"] == math.inf and q["ssim"] == pytest.approx(1.0) and q["lpips"] == pytest.approx(0.0, abs=1e-6)
    shuffled = methods["shuffle"]["evaluators"][ev["name"]]
    assert shuffled["asr"] >= 0.9
    assert shuffled["rank1"] < 0.1


def test_featdeid_eval_cli_end_to_end_writes_report(tmp_path, random_model, eval_cache):
    from featdeid.cli import main

    assets = require_asset()
    require_asset("faces", "lfw_pairs150", "pairs.txt")
    model_dir = random_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    argv = [
        "eval", "--set", "lfw", "--assets", str(assets), "--out", str(out), "--model", str(model_dir),
        "--methods", "featdeid@1,blur@4,mask,adv@4x2", "--sweep", "0.5",
        "--evaluators", f"mobilefacenet:{require_asset(*MFN)}", "--whitebox", f"onnx:{require_asset(*EN)}",
        "--robustness", "--attacks", "jpeg10,gauss5", "--limit", "5", "--frame-size", str(FRAME),
        "--cache-dir", str(eval_cache), "--examples", "2", "--workers", "0", "-q",
    ]  # fmt: skip
    assert main(argv) == 0
    umask = images._umask()
    for name in ("results.json", "report.md"):  # written like any output file, not mkstemp's owner-only 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["methods"]]
    assert names == ["featdeid@1", "blur@4", "mask", "adv@4x2", "featdeid@0.5"]
    roles = {e["name"]: e["role"] for e in res["evaluators"]}
    assert roles == {"mobilefacenet": "black-box", "fr_feature": "white-box"}
    for m in res["methods"]:
        for ev in roles:
            r = m["evaluators"][ev]
            assert 0 <= r["asr"] <= 1 and 0 <= r["rank1"] <= r["rank5"] <= 1
            assert set(r["robustness"]) == {"none", "jpeg10", "gauss5"}
        assert m["quality"]["lpips"] > 0 and m["quality"]["ssim"] < 1
        assert "wall" in m["timings"]
    assert res["set"]["fallback_alignment"]["count"] >= 0
    md = (out / "report.md").read_text()
    assert "## Black-box evaluators" in md and "## White-box evaluator" in md and "| featdeid s=1 (`featdeid@1`)" in md
    assert "## Robustness" in md and "## Timing" in md
    for png in ("quality_vs_asr", "differences", "cmc_mobilefacenet", "cmc_fr_feature", "robustness_mobilefacenet"):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
    # resume: the same command reuses the cached originals and every finished method
    assert main([*argv, "--resume"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert all(e["cached"] for e in res2["evaluators"])
    assert [e["threshold"] for e in res2["evaluators"]] == [e["threshold"] for e in res["evaluators"]]
    assert all(m.get("resumed") for m in res2["methods"])
    assert [m["evaluators"]["mobilefacenet"]["asr"] for m in res2["methods"]] == [m["evaluators"]["mobilefacenet"]["asr"] for m in res["methods"]]


def test_eval_cli_usage_errors(tmp_path, capsys):
    from featdeid.evaluation.cli import main

    assets = require_asset()
    common = ["--assets", str(assets), "--out", str(tmp_path / "o"), "--limit", "2", "-q"]
    assert main([*common, "--methods", "warp@2", "--evaluators", f"mobilefacenet:{require_asset(*MFN)}", "--whitebox", "none"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main([*common, "--evaluators", "mobilefacenet:/nonexistent.ckpt", "--whitebox", "none"]) == 2
    assert main([*common, "--model", str(tmp_path / "no-model"), "--evaluators", f"mobilefacenet:{require_asset(*MFN)}", "--whitebox", "none"]) == 2
    assert "error" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "featdeid.evaluation", "--help"], capture_output=True, text=True, cwd=REPO, env={**os.environ}, timeout=120)
    assert out.returncode == 0 and "--robustness" in out.stdout and "--sweep" in out.stdout


def test_celeba_photo_mode_counts_lost_faces(tmp_path, eval_cache):
    from featdeid.evaluation import EvalConfig, evaluate

    assets = require_asset()
    require_asset("faces", "celeba_wild_id50", "images")
    res = evaluate(
        EvalConfig(
            assets=assets,
            out=tmp_path,
            set="celeba",
            evaluators=[f"mobilefacenet:{require_asset(*MFN)}"],
            methods=["identity", "mask"],
            limit=2,
            frame_size=FRAME,
            cache_dir=eval_cache,
            progress=False,
            workers=0,
        )
    )
    assert res["set"]["mode"] == "photos" and res["set"]["images"] == 16
    ev = res["evaluators"][0]
    m = {x["name"]: x for x in res["methods"]}
    assert m["identity"]["not_redetected"] == 0
    assert m["identity"]["evaluators"][ev["name"]]["asr"] == pytest.approx(ev["asr_original"])
    assert m["mask"]["evaluators"][ev["name"]]["asr"] > 0.5  # a grey face: lost or unrecognisable
    assert "not_redetected" in m["mask"]


def test_dlib_worker_process_gives_the_same_embeddings():
    pytest.importorskip("dlib")
    from featdeid.evaluation.evaluators import Evaluator
    from featdeid.faces.align import align

    imgs = sorted(require_asset("faces", "bbt40", "images").glob("*.png"))[:3]
    frames = torch.cat([align(p, FRAME, "dlib", largest=True)[0] for p in imgs])
    u8 = frames.mul(255).round().to(torch.uint8).numpy()
    local = Evaluator("dlib", workers=0)
    remote = Evaluator("dlib", workers=1, batch_size=2)
    try:
        a = local.embed(u8)
        b = remote.embed(u8)
    finally:
        remote.close()
    assert remote.in_worker is False  # closed
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (3, 128) and remote.count == 3 and remote.busy_s > 0


def test_worker_exits_when_its_parent_is_killed(tmp_path):
    """A killed ``featdeid eval`` (SIGKILL: no cleanup) must not leave its dlib worker running."""
    import signal
    import time

    script = (
        "import numpy as np, sys, time\n"
        "from featdeid.evaluation.evaluators import Evaluator\n"
        "ev = Evaluator('dlib', workers=1)\n"
        "ev.embed(np.zeros((1, 3, 150, 150), np.uint8))\n"
        "print(*ev._pool._processes, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(w) for w in proc.stdout.readline().split()]
        assert len(workers) == 1
        os.kill(workers[0], 0)  # alive while the parent is
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(workers[0], 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(workers[0], signal.SIGKILL)
            pytest.fail("the dlib worker outlived its killed parent")
    finally:
        proc.kill()


def test_bench_times_datasets_map_and_the_adversarial_baseline(tmp_path, random_model):
    pytest.importorskip("datasets")
    from featdeid.bench import main as bench_main

    assets = require_asset()
    require_asset(*EN)
    model_dir = random_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    argv = ["--configs", "small", "--batch-sizes", "1", "--precisions", "fp32", "--channels-last", "off", "--min-time", "0.05",
            "--faces", "2", "--adv", "4x1", "--assets", str(assets), "--model", str(model_dir), "--json", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    faces = json.loads(out.read_text())["faces"]
    assert faces["faces"] == 2 and faces["threads"] >= 1 and faces["dtype"] == "float32"
    assert faces["datasets_map"]["images_per_s"] > 0 and faces["adversarial_frames"]["faces_per_s"] > 0
    assert faces["ratio_featdeid_over_adversarial"] > 0 and faces["peak_rss_mib"] > 0
