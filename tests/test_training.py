"""training/: the paper's losses, data preparation, Accelerate training (2 processes, resume, export)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, require_asset
from featdeid.errors import ConfigError
from featdeid.model import HidingNetwork

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from training.augment import TransferConfig, en_view, gaussian_blur, jpeg_like  # noqa: E402
from training.config import config_from_dict, expand_env, load_config, read_config  # noqa: E402
from training.ghost import GhostSkips, activations, residual_adds  # noqa: E402
from training.data import PairDataset, SourceSpec, prepare_images, split_indices  # noqa: E402
from training.losses import (  # noqa: E402
    LOSS_NAMES,
    DeidLoss,
    LossConfig,
    budget_loss,
    build_lpips,
    check_weights,
    far_loss,
    lpips_features,
    lpips_from_features,
    near_loss,
    perceptual_loss,
    reconstruction_loss,
)
from training.vgg import VGGFeatures  # noqa: E402

TRAIN = REPO / "training" / "train.py"
VGG16 = ("weights", "imagenet_vgg16", "vgg16_features_fp16.safetensors")
LIN = ("weights", "imagenet_vgg16", "lpips_v0.1_vgg_lin.safetensors")
EN = ("weights", "faceplugin_fr_feature", "fr_feature.onnx")
COVERS = ("faces", "utkface_5k", "images")
FAKES = ("faces", "gan_generatedphotos_2k", "images")
MID_LAYERS = ("net.Add_32", "net.Add_73")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_config(**kw) -> LossConfig:
    files = {
        "perceptual_weights": str(require_asset(*VGG16)),
        "lpips_backbone_weights": str(require_asset(*VGG16)),
        "lpips_lin_weights": str(require_asset(*LIN)),
    }
    return LossConfig(**{**files, **kw})


@pytest.fixture(scope="module")
def lpips_model():
    return build_lpips(require_asset(*VGG16), require_asset(*LIN))


@pytest.fixture(scope="module")
def faces64() -> torch.Tensor:
    """Four real covers, aligned at 64 px: ``(4, 3, 64, 64)`` in [0, 1]."""
    files = sorted(require_asset(*COVERS).iterdir())[:4]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((64, 64)))).permute(2, 0, 1) for f in files]).float() / 255


# ---------------------------------------------------------------- losses


def test_reconstruction_loss_known_values():
    c = torch.zeros(2, 3, 8, 8)
    d = torch.full((2, 3, 8, 8), 0.5)
    d[1] = 0.25
    assert torch.allclose(reconstruction_loss(c, c), torch.zeros(2))
    assert torch.allclose(reconstruction_loss(c, d, "l2"), torch.tensor([0.25, 0.0625]))
    assert torch.allclose(reconstruction_loss(c, d, "l1"), torch.tensor([0.5, 0.25]))


def test_perceptual_loss_known_values_and_vgg_weights():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.ones(1, 2, 2, 2) * 3
    assert torch.allclose(perceptual_loss(a, b), torch.tensor([9.0]))
    vgg = VGGFeatures("vgg16", require_asset(*VGG16))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in vgg.parameters())
    w = vgg.layers[0].weight[0, 0, 0]  # SOURCE.md fingerprint: features.0.weight[0] row 0
    assert torch.allclose(w, torch.tensor([-0.5537, 0.1427, 0.5290]), atol=1e-3)
    assert len(vgg.layers) == 30  # truncated after relu5_3
    with pytest.raises(ConfigError, match="vgg16"):
        VGGFeatures("vgg11", None)


def test_lpips_from_local_files_matches_package_forward(lpips_model, faces64):
    x, y = faces64[:2], faces64[2:]
    ref = lpips_model(x, y, normalize=True).flatten()
    ours = lpips_from_features(lpips_model, lpips_features(lpips_model, x), lpips_features(lpips_model, y))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(lpips_model(x, x, normalize=True).flatten(), torch.zeros(2), atol=1e-6)
    assert (ref > 0.05).all()
    # SOURCE.md: torchmetrics doctest value for LPIPS-vgg on seeded random images
    torch.manual_seed(123)
    img1, img2 = torch.rand(10, 3, 100, 100) * 2 - 1, torch.rand(10, 3, 100, 100) * 2 - 1
    assert lpips_model(img1, img2).mean().item() == pytest.approx(0.3493, abs=0.02)


def test_near_and_far_losses_on_known_features():
    e = F.normalize(torch.randn(3, 512), dim=1)
    assert torch.allclose(near_loss(e, e), torch.zeros(3), atol=1e-6)
    assert torch.allclose(far_loss(e, e), torch.ones(3), atol=1e-6)
    x = torch.zeros(2, 4)
    x[:, 0] = 1
    y = torch.zeros(2, 4)
    y[0, 1] = 1
    y[1, 0] = -1
    assert torch.allclose(near_loss(x, y), torch.tensor([1.0, 2.0]))
    assert torch.allclose(far_loss(x, y, "cos"), torch.tensor([0.0, -1.0]))
    assert torch.allclose(far_loss(x, y, "relu"), torch.tensor([0.0, 0.0]))
    c = torch.randn(5, 8)
    d = torch.randn(5, 8, requires_grad=True)
    cos = torch.nn.functional.cosine_similarity(c, d, dim=1)
    hard = far_loss(c, d, "hard")
    worst = cos.topk(3).values
    assert torch.allclose(hard.mean(), worst.mean()) and int((hard != 0).sum()) == 3
    hard.mean().backward()
    assert int((d.grad.abs().sum(1) > 0).sum()) == 3  # the easier faces get no far gradient


def test_total_loss_is_the_weighted_sum(faces64):
    from featdeid.recognisers import load_recogniser

    en = load_recogniser(f"onnx:{require_asset(*EN)}")
    weights = {"rec": 1.0, "perc": 0.5, "lpips": 2.0, "near": 0.3, "far": 0.7, "mid": 0.4, "budget": 0.6}
    loss = DeidLoss(_loss_config(weights=weights, mid_layers=MID_LAYERS), en)
    assert loss.shared_vgg
    c, d = faces64[:2], faces64[2:].clone().requires_grad_(True)
    fe = en.embed(faces64[[3, 2]])
    out = loss(c, d, fe)
    expect = sum(weights[k] * out[k] for k in LOSS_NAMES)
    assert set(out) == {*LOSS_NAMES, "total"}
    assert torch.allclose(out["total"], expect)
    out["total"].mean().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    same = loss(c, c, en.embed(c))
    for k in ("rec", "perc", "lpips", "near", "budget"):
        assert torch.allclose(same[k], torch.zeros(2), atol=1e-5), k
    assert torch.allclose(same["far"], torch.ones(2), atol=1e-5)
    assert torch.allclose(same["mid"], torch.ones(2), atol=1e-5)
    vgg = require_asset(*VGG16)
    separate = DeidLoss(
        _loss_config(weights=weights, perceptual_weights=f"{vgg.parent}/./{vgg.name}", mid_layers=MID_LAYERS), en
    )
    assert not separate.shared_vgg
    assert torch.allclose(separate(c, d.detach(), fe)["perc"], out["perc"].detach(), atol=1e-4)


def test_budget_loss_is_free_inside_the_psnr_budget():
    c = torch.full((2, 3, 8, 8), 0.5)
    d = c.clone()
    d[0] += 0.01  # MSE 1e-4: 40 dB, inside a 30 dB budget
    d[1] += 0.1  # MSE 1e-2: 20 dB, 10x over the 30 dB budget's 1e-3
    assert torch.allclose(budget_loss(c, d, 30.0), torch.tensor([0.0, 9.0]), atol=1e-3)
    with pytest.raises(ConfigError, match="budget_psnr"):
        LossConfig(budget_psnr=5)


def test_mid_loss_sees_c_and_d_through_one_view(faces64):
    from featdeid.recognisers import load_recogniser

    en = load_recogniser(f"onnx:{require_asset(*EN)}")
    loss = DeidLoss(_loss_config(weights={"rec": 1.0, "mid": 1.0}, mid_layers=MID_LAYERS), en)
    cfg = TransferConfig(crop_jitter=True, crop_scale=0.3, crop_shift=0.2, blur=True, blur_p=1.0)
    gen = torch.Generator().manual_seed(0)
    c = faces64[:2]
    same = loss(c, c.clone(), None, en_view=lambda x: en_view(x, cfg, gen))
    assert torch.allclose(same["mid"], torch.ones(2), atol=1e-5)  # D = C: one view for both, maps stay aligned
    d = (c + 0.15 * torch.randn_like(c)).clamp(0, 1).requires_grad_(True)
    moved = loss(c, d, None, en_view=lambda x: en_view(x, cfg, gen))
    assert (moved["mid"] < 0.99).all()
    moved["total"].sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="net.Add_32"):
        DeidLoss(_loss_config(weights={"mid": 1.0}, mid_layers=("Add_32",)), en)
    with pytest.raises(ConfigError, match="mid_layers"):
        LossConfig(weights={"mid": 1.0})


def test_ghost_en_erodes_skips_per_draw_and_scales_branch_gradients(faces64):
    from featdeid.recognisers import load_recogniser

    en = load_recogniser(f"onnx:{require_asset(*EN)}")
    adds = residual_adds(en.net)
    assert len(adds) == 12 and all(i == 0 for _, i in adds)  # MobileFaceNet-style: skip first, branch second
    x = faces64[:2]
    clean = en.embed(x)
    ghost = GhostSkips(en.net, tau=0.1)
    with ghost.draw(2, torch.Generator().manual_seed(0)):
        a, a2 = en.embed(x), en.embed(x)
    with ghost.draw(2, torch.Generator().manual_seed(1)):
        b = en.embed(x)
    assert torch.equal(a, a2)  # one ghost for every call inside a draw: C and D see the same network
    cos = F.cosine_similarity(clean, a)
    assert (cos < 0.9999).all() and (cos > 0.8).all() and not torch.allclose(a, b)
    assert torch.equal(en.embed(x), clean)  # hooks are gone after the draw
    xr = x.clone().requires_grad_(True)
    en.embed(xr).sum().backward()
    g_clean, xr.grad = xr.grad.clone(), None
    with GhostSkips(en.net, gamma=0.5).draw(2, torch.Generator()):
        out = en.embed(xr)
    assert torch.allclose(out, clean, atol=1e-5)  # skip gradient changes the backward pass only
    out.sum().backward()
    assert F.cosine_similarity(g_clean.flatten(), xr.grad.flatten(), dim=0) < 0.99
    xr.grad = None
    linear = GhostSkips(en.net, linear_from=0.5)
    assert len(activations(en.net)) == 33 and len(linear.linear) == 17  # PReLUs 17 to 33
    with linear.draw(2, torch.Generator()):
        out = en.embed(xr)
    assert torch.allclose(out, clean, atol=1e-5)  # linear backpropagation changes the backward pass only
    out.sum().backward()
    assert F.cosine_similarity(g_clean.flatten(), xr.grad.flatten(), dim=0) < 0.99
    grads = {}
    for mix in (1.0, 0.3):  # only the last PReLU: its backward mixes the identity's and its own
        xr.grad = None
        with GhostSkips(en.net, linear_from=32 / 33, linear_mix=mix).draw(2, torch.Generator()):
            out = en.embed(xr)
        assert torch.equal(out, clean)
        out.sum().backward()
        grads[mix] = xr.grad.clone()
    xr.grad = None
    en.embed(xr).sum().backward()
    torch.testing.assert_close(grads[0.3], 0.3 * grads[1.0] + 0.7 * xr.grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grads[0.3], xr.grad, atol=1e-5)
    with pytest.raises(ConfigError, match="linbp_mix"):
        GhostSkips(en.net, linear_mix=0.0)
    with pytest.raises(ConfigError, match="skip_grad"):
        GhostSkips(en.net, gamma=0.0)
    with pytest.raises(ConfigError, match="linbp_from"):
        GhostSkips(en.net, linear_from=1.5)
    with pytest.raises(ConfigError, match="torch.fx"):
        residual_adds(torch.nn.Linear(2, 2))


def test_strength_choice_keeps_a_confidence_margin_on_every_target():
    from training.select_strength import choose

    rows = [{"strength": st, "psnr": ps, "ssim": 0.95, "lpips": lp, "psnr_se": 0.1, "ssim_se": 0.001, "lpips_se": 0.001}
            for st, ps, lp in ((1.0, 31.0, 0.030), (1.2, 30.3, 0.040), (1.3, 30.05, 0.045), (1.4, 29.8, 0.049))]
    assert choose(rows, 30.0, 0.93, 0.05) == 1.3  # the means alone
    assert choose(rows, 30.0, 0.93, 0.05, z=1.645) == 1.2  # 30.05 - 0.16 < 30
    assert choose(rows, 30.0, 0.93, 0.041, z=1.645) == 1.0  # at 1.2 LPIPS 0.040 + 0.0016 > 0.041
    assert choose(rows, 32.0, 0.93, 0.05, z=1.645) is None


def test_unknown_loss_weight_name_lists_valid_names():
    with pytest.raises(ConfigError, match="rec, perc, lpips, near, far") as e:
        check_weights({"rec": 1.0, "lambda_near": 0.3})
    assert "lambda_near" in str(e.value)
    with pytest.raises(ConfigError):
        check_weights({"rec": -1})
    with pytest.raises(ConfigError, match="rec_norm"):
        LossConfig(rec_norm="l3")


# ---------------------------------------------------------------- config and augmentation


def test_env_expansion_and_config_errors(monkeypatch):
    monkeypatch.setenv("FT_A", "/x")
    monkeypatch.delenv("FT_B", raising=False)
    assert expand_env({"p": ["${FT_A}/y", "${FT_B:-${FT_A}/z}"]}) == {"p": ["/x/y", "/x/z"]}
    with pytest.raises(ConfigError, match="FT_B"):
        expand_env("${FT_B}")
    base = {"name": "t", "recogniser": "onnx:/a/b/en.onnx", "data": {"cover": "/c", "embed_mode": "noise"}}
    cfg = config_from_dict(base)
    assert cfg.exported_recogniser() == "onnx:b/en.onnx" and cfg.optim.lr == 1e-5
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({**base, "optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="valid names"):
        config_from_dict({**base, "losses": {"weights": {"nearr": 1}}})
    with pytest.raises(ConfigError, match="fit_strength_head"):
        config_from_dict({**base, "model": {"preset": "small_cpu", "adaptive_strength": 0.2}})


def test_config_base_chain(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(
        "name: root\nrecogniser: onnx:/a/en.onnx\ndata: {cover: /c, embed_mode: noise}\n"
        "losses: {weights: {near: 0.1, far: 0.2}, mid_layers: [a, b]}\noptim: {lr: 1.0e-4, batch_size: 8}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nname: mid\noptim: {lr: 5.0e-4}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text(
        "base: mid.yaml\nname: leaf\nlosses: {weights: {far: 0.4}, mid_layers: [c]}\n")
    leaf = load_config(tmp_path / "sub" / "leaf.yaml", {"optim.batch_size": 4})
    assert leaf.name == "leaf" and leaf.optim.lr == 5e-4 and leaf.optim.batch_size == 4
    assert leaf.losses.weights["near"] == 0.1 and leaf.losses.weights["far"] == 0.4  # mappings merge
    assert list(leaf.losses.mid_layers) == ["c"]  # lists replace
    assert load_config(tmp_path / "sub" / "mid.yaml").optim.batch_size == 8
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\nname: c\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*base of"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [root.yaml]\n")
    with pytest.raises(ConfigError, match="base must be"):
        load_config(tmp_path / "d.yaml")


def test_experiment_configs_load_and_use_allowed_data():
    configs = sorted((REPO / "training" / "configs").glob("*.yaml"))
    names = {p.stem for p in configs}
    assert {"table2_a_near", "table2_b_far", "table2_c_nearfar", "table3_face", "table3_noise", "table3_object",
            "table5_real", "table5_fake", "table6", "small_cpu"} <= names
    expected = {"table2_a_near": (0.30, 0), "table2_b_far": (0, 0.30), "table2_c_nearfar": (0.14, 0.14),
                "table3_face": (0.30, 0), "table3_noise": (0.26, 0), "table3_object": (0.30, 0),
                "table5_real": (0.14, 0.14), "table5_fake": (0.125, 0.125), "table6": (0.125, 0.125)}
    for path in configs:
        text = json.dumps(read_config(path))
        for banned in ("lfw_pairs150", "celeba_wild_id50", "bbt40"):
            assert banned not in text, (path, banned)
        cfg = load_config(path)
        w = cfg.losses.weights
        if w["budget"]:  # quality as a PSNR budget, not the paper's equal-weight trade-off
            assert w["rec"] == 0 and w["perc"] > 0 and w["lpips"] > 0 and w["mid"] > 0
        else:
            assert (w["rec"], w["perc"], w["lpips"]) == (1.0, 1.0, 1.0)
        if path.stem in expected:
            assert (w["near"], w["far"]) == expected[path.stem]
            assert cfg.model.image_size == 256 and cfg.optim.epochs == 150 and cfg.optim.lr == 1e-5
        exported = cfg.exported_recogniser().split(":", 1)[1]
        assert not exported.startswith("/") and exported.count("/") <= 1, exported
    small = load_config(REPO / "training" / "configs" / "small_cpu.yaml")
    assert small.model.image_size == 128
    assert Path(small.data.cover.path) == require_asset(*COVERS)
    assert Path(small.data.embed.path) == require_asset(*FAKES)


def test_transfer_views_keep_shape_and_gradients(faces64):
    gen = torch.Generator().manual_seed(0)
    x = faces64.clone().requires_grad_(True)
    cfg = TransferConfig(crop_jitter=True, blur=True, blur_p=1.0, jpeg=True, jpeg_p=1.0)
    y = en_view(x, cfg, gen)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    q95 = (jpeg_like(faces64, torch.full((4,), 95.0)) - faces64).abs().mean()
    q10 = (jpeg_like(faces64, torch.full((4,), 10.0)) - faces64).abs().mean()
    assert 0 < q95 < 0.01 < q10 < 0.08, (q95, q10)


# ---------------------------------------------------------------- data


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="data folder not found"):
        prepare_images(SourceSpec(str(tmp_path / "nope")), 64, cache_dir=tmp_path / "cache", progress=False)


def test_unreadable_and_non_image_files_are_reported_as_skipped(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    faces = sorted(require_asset(*COVERS).iterdir())[:3]
    for i, f in enumerate(faces):
        shutil.copy(f, (src / "sub" if i else src) / f.name)
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    (src / "truncated.png").write_bytes(Path(faces[0]).read_bytes()[:200])
    (src / "notes.txt").write_text("hello")
    Image.new("RGB", (120, 120), (128, 128, 128)).save(src / "blank.png")
    out = prepare_images(SourceSpec(str(src)), 64, cache_dir=tmp_path / "cache", progress=False)
    r = out.report
    assert (r.total, r.used, len(out)) == (7, 3, 3)
    assert sorted(r.skipped["unreadable"]) == ["broken.jpg", "truncated.png"]
    assert r.skipped["not_image"] == ["notes.txt"] and r.skipped["no_face"] == ["blank.png"]
    assert "3 of 7 images used" in r.summary()
    assert out.images.dtype == np.uint8 and out.get(0).shape == (64, 64, 3)
    again = prepare_images(SourceSpec(str(src)), 64, cache_dir=tmp_path / "cache", progress=False)
    assert again.keys == out.keys and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="no usable images"):
        prepare_images(SourceSpec(str(only_bad)), 64, cache_dir=tmp_path / "cache", progress=False)


def test_hf_imagefolder_source_and_object_mode(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for f in sorted(require_asset(*FAKES).rglob("*.jpg"))[:3]:
        shutil.copy(f, src / f.name)
    hf = prepare_images(SourceSpec(str(src), kind="hf_imagefolder"), 64, cache_dir=tmp_path / "c", progress=False)
    folder = prepare_images(SourceSpec(str(src)), 64, cache_dir=tmp_path / "c", progress=False)
    assert len(hf) == len(folder) == 3
    obj = prepare_images(SourceSpec(str(src)), 64, mode="object", cache_dir=tmp_path / "c", progress=False)
    assert obj.report.used == 3 and not obj.report.skipped


def test_pair_dataset_is_a_function_of_seed_epoch_index(tmp_path):
    covers = prepare_images(SourceSpec(str(require_asset(*COVERS)), limit=6), 64, cache_dir=tmp_path, progress=False)
    tr, va = split_indices(len(covers), 0.34, 0)
    assert len(va) == 2 and len(tr) == 4 and not set(tr) & set(va)
    ds = PairDataset(covers, tr, None, None, "noise", 64, seed=3, flip=True)
    a = ds[1]
    assert a["embed"].shape == (3, 64, 64) and abs(float(a["embed"].std()) - 1) < 0.1
    assert torch.equal(ds[1]["embed"], a["embed"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["embed"], a["embed"])


# ---------------------------------------------------------------- training runs


def _tiny_config(tmp: Path, cache: Path, covers: int = 24, val: float = 0.2, near: float = 0.125, far: float = 0.125,
                 lr: float = 1e-3, precision: str = "no") -> Path:
    cfg = {
        "name": "tiny",
        "model": {"preset": "small_cpu", "image_size": 64, "base_channels": 8, "channel_mults": [1, 2, 4]},
        "recogniser": f"onnx:{require_asset(*EN)}",
        "data": {
            "cover": {"path": str(require_asset(*COVERS)), "limit": covers},
            "embed": {"path": str(require_asset(*FAKES)), "limit": 12},
            "val_fraction": val,
            "embed_val_fraction": 0.25,
            "cache_dir": str(cache),
        },
        "losses": {
            "weights": {"rec": 1.0, "perc": 1.0, "lpips": 1.0, "near": near, "far": far},
            "perceptual_weights": str(require_asset(*VGG16)),
            "lpips_backbone_weights": str(require_asset(*VGG16)),
            "lpips_lin_weights": str(require_asset(*LIN)),
        },
        "optim": {"lr": lr, "batch_size": 4, "epochs": 50},
        "run": {"output": str(tmp / "run"), "mixed_precision": precision, "checkpoint_every": 2, "log_every": 1},
    }
    path = tmp / "tiny.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train_rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aligned")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _tiny_config(tmp, cache_dir, precision="bf16")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
          str(TRAIN), "--config", str(cfg), "--max-steps", "3", "--output", str(tmp / "run")], timeout=300)
    return tmp / "run"


def test_two_processes_end_with_identical_weights(two_process_run):
    hashes = [(two_process_run / f"state_sha256_rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]
    rows = _train_rows(two_process_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["total"])) for r in rows)
    report = json.loads((two_process_run / "data_report.json").read_text())
    assert report[0]["used"] == 24


def test_exported_model_loads_and_runs(two_process_run):
    folder = two_process_run / "model"
    model = HidingNetwork.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["recogniser"] == "onnx:faceplugin_fr_feature/fr_feature.onnx"
    assert model.identity_bank.shape == (9, 512)  # 12 fake faces, 25% held out
    assert torch.allclose(model.identity_bank.norm(dim=1), torch.ones(9), atol=1e-4)
    assert (folder / "README.md").is_file()
    cover = torch.rand(2, 3, 64, 64)
    out = model(cover, model.identity_bank[:2])
    assert out.shape == cover.shape and torch.isfinite(out).all()
    import featdeid

    if hasattr(featdeid, "load"):
        loaded = featdeid.load(folder)
        net = loaded if isinstance(loaded, HidingNetwork) else getattr(loaded, "model", loaded)
        assert torch.equal(net.identity_bank, model.identity_bank)


def test_a_training_checkpoint_exports_as_a_model_folder(two_process_run, tmp_path):
    ckpt = sorted((two_process_run / "checkpoints").glob("step_*"))[-1]
    out = tmp_path / "from_ckpt"
    _run([sys.executable, str(REPO / "training" / "export.py"), "--config", str(two_process_run.parent / "tiny.yaml"),
          "--weights", str(ckpt), "--output", str(out), "--flip-average", "--sharpen", "0.5", "--chroma", "0"])
    model, trained_cfg = HidingNetwork.from_pretrained(out), HidingNetwork.from_pretrained(two_process_run / "model").config
    assert model.config.sharpen == 0.5 and trained_cfg.sharpen == 0.0
    assert model.config.chroma == 0.0 and trained_cfg.chroma == 1.0
    assert model.config.flip_average and not trained_cfg.flip_average
    from featdeid.weights import load_safetensors

    trained = load_safetensors(ckpt / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k].float(), v.float()) for k, v in trained.items() if k != "identity_bank")
    assert model.identity_bank.shape == (9, 512) and ckpt.name in (out / "README.md").read_text()


def test_export_keeps_the_reshapings_the_weights_were_trained_through(two_process_run, tmp_path):
    """Weights trained through sharpening keep it on export although --config (tiny.yaml) has none."""
    from training.config import load_config
    from training.export import export_model

    cfg = load_config(two_process_run.parent / "tiny.yaml")
    assert cfg.model.sharpen == 0.0
    best = tmp_path / "best"
    shutil.copytree(two_process_run / "model", best)
    data = json.loads((best / "config.json").read_text())
    (best / "config.json").write_text(json.dumps({**data, "sharpen": 0.7, "sharpen_sigma": 1.5}))
    run = tmp_path / "run"
    ckpt = sorted((two_process_run / "checkpoints").glob("step_*"))[-1]
    shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
    run_cfg = json.loads((two_process_run / "config.json").read_text())
    run_cfg["model"].update(sharpen=0.7, sharpen_sigma=1.5)
    (run / "config.json").write_text(json.dumps(run_cfg))
    for weights in (best, run / "checkpoints" / ckpt.name):
        exported = HidingNetwork.from_pretrained(export_model(weights, cfg, tmp_path / f"out_{weights.name}")).config
        assert (exported.sharpen, exported.sharpen_sigma) == (0.7, 1.5)
    out = export_model(best, cfg, tmp_path / "explicit", sharpen=0.0)
    assert HidingNetwork.from_pretrained(out).config.sharpen == 0.0


def test_loss_falls_when_overfitting_8_images(tmp_path, cache_dir):
    cfg = _tiny_config(tmp_path, cache_dir, covers=8, val=0.0, near=1.0, far=1.0, lr=1e-3)
    _run([sys.executable, str(TRAIN), "--config", str(cfg), "--max-steps", "30", "--set", "run.checkpoint_every=100"])
    rows = _train_rows(tmp_path / "run")
    losses = [float(r["total"]) for r in rows]
    assert len(losses) == 30
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert last < 0.85 * first, (first, last)
    assert np.mean([float(r["far"]) for r in rows[-6:]]) < 0.8  # D moved away from C in EN's feature space


def test_resume_matches_an_uninterrupted_run(tmp_path, cache_dir):
    cfg = _tiny_config(tmp_path, cache_dir)
    _run([sys.executable, str(TRAIN), "--config", str(cfg), "--max-steps", "6", "--output", str(tmp_path / "full")])
    _run([sys.executable, str(TRAIN), "--config", str(cfg), "--max-steps", "3", "--output", str(tmp_path / "split")])
    proc = _run([sys.executable, str(TRAIN), "--config", str(cfg), "--max-steps", "6", "--output", str(tmp_path / "split"),
                 "--resume", str(tmp_path / "split")])
    assert "resumed from" in proc.stdout + proc.stderr
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step_000000006" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_000000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    steps = [int(r["step"]) for r in _train_rows(tmp_path / "split")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_missing_recogniser_fails_before_any_work(tmp_path, cache_dir, capsys):
    from training.robust_en import main as robust_main

    cfg = json.loads(_tiny_config(tmp_path, cache_dir).read_text())
    cfg["recogniser"] = f"onnx:{tmp_path / 'no-such-en.onnx'}"
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")  # the data step would create it
    path = tmp_path / "missing.yaml"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(path)], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ONNX model not found" in proc.stderr and "no-such-en.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert robust_main(["--config", str(path), "--output", str(tmp_path / "robust.onnx")]) == 2
    assert "error: ONNX model not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists() and not (tmp_path / "robust.onnx").exists()


def test_robust_en_is_a_drop_in_recogniser(tmp_path, cache_dir, capsys):
    from featdeid.recognisers import load_recogniser
    from training.experiment import build_loss, build_recogniser
    from training.robust_en import main as robust_main

    cfg_path = _tiny_config(tmp_path, cache_dir)
    out = tmp_path / "en" / "robust.onnx"
    assert robust_main(["--config", str(cfg_path), "--output", str(out), "--steps", "3", "--batch-size", "4"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_mode & 0o044  # readable like any other written file, not mkstemp's 0600
    assert report["train_images"] == 19 + 9 and report["val_covers"] == 5
    assert report["before"]["clean"] == pytest.approx(1.0, abs=1e-4)
    assert report["before"]["attacked"] < report["before"]["clean"]
    en, robust = load_recogniser(f"onnx:{require_asset(*EN)}"), load_recogniser(f"onnx:{out}")
    assert dict(en.net.named_modules()).keys() == dict(robust.net.named_modules()).keys()
    changed = [not torch.equal(a, b) for a, b in zip(en.state_dict().values(), robust.state_dict().values())]
    assert any(changed)
    frames = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cos = (en.embed(frames) * robust.embed(frames)).sum(1)
    assert bool((cos < 0.99999).any())
    assert report["after"]["clean"] > 0.8  # still the EN's function on real faces
    raw = json.loads(cfg_path.read_text())
    swapped = config_from_dict({**raw, "recogniser": f"onnx:{out}",
                                "losses": {**raw["losses"], "mid_layers": ["net.Add_32"],
                                           "weights": {"rec": 1.0, "near": 0.1, "far": 0.1, "mid": 0.1}}})
    assert build_loss(swapped, build_recogniser(swapped)).tap is not None
    assert robust_main(["--config", str(cfg_path), "--output", str(tmp_path / "bad.onnx"), "--eps", "0"]) == 2
    assert "error: robust EN: need eps > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    # --init continues from an earlier robust EN; the teacher stays the config's EN
    more = tmp_path / "en" / "more.onnx"
    assert robust_main(["--config", str(cfg_path), "--output", str(more), "--steps", "2", "--batch-size", "4", "--eps", "3", "--init", str(out)]) == 0
    cont = json.loads(more.with_suffix(".json").read_text())
    assert cont["init"] == str(out) and cont["eps"] == 3.0
    assert cont["before"]["clean"] == pytest.approx(report["after"]["clean"], abs=1e-3)
    assert robust_main(["--config", str(cfg_path), "--output", str(tmp_path / "bad.onnx"), "--init", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


def test_extrapolate_moves_along_the_line_through_two_checkpoints(tmp_path):
    from featdeid.config import ModelConfig
    from featdeid.weights import load_safetensors

    cfg = ModelConfig(image_size=32, base_channels=8, channel_mults=(1, 2), res_blocks=1, groups=4)
    torch.manual_seed(0)
    a, b = HidingNetwork(cfg), HidingNetwork(cfg)
    for p in b.parameters():
        torch.nn.init.normal_(p)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    script = str(REPO / "training" / "extrapolate.py")
    _run([sys.executable, script, "--from", str(tmp_path / "b"), "--to", str(tmp_path / "a"), "--alpha", "0.5",
          "--output", str(tmp_path / "w")])
    w = load_safetensors(tmp_path / "w" / "model.safetensors")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(w[k], 1.5 * sa[k] - 0.5 * sb[k], atol=1e-6) for k in sa)
    assert not torch.allclose(w["head.weight"], sa["head.weight"])
    assert json.loads((tmp_path / "w" / "config.json").read_text()) == json.loads((tmp_path / "a" / "config.json").read_text())
    HidingNetwork.from_pretrained(tmp_path / "w")

    other = HidingNetwork(ModelConfig(image_size=32, base_channels=16, channel_mults=(1, 2), res_blocks=1, groups=4))
    other.save_pretrained(tmp_path / "c")
    r = subprocess.run([sys.executable, script, "--from", str(tmp_path / "c"), "--to", str(tmp_path / "a"), "--alpha", "1",
                        "--output", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and "different networks" in r.stderr and not (tmp_path / "bad").exists()


def test_init_from_copies_weights_across_inference_reshapings_but_not_architectures(random_model, model_dir):
    """run.init_from: mirror average and sharpening shape no weights, so a run may train through them."""
    import dataclasses

    from training.train import init_weights

    reshaped = dataclasses.replace(random_model.config, flip_average=True, sharpen=1.0, sharpen_sigma=1.5, default_strength=0.7)
    target = HidingNetwork(reshaped)

    def weights(m):
        return {k: v for k, v in m.state_dict().items() if k != "identity_bank"}

    assert not torch.equal(weights(target)["head.weight"], weights(random_model)["head.weight"])
    init_weights(target, model_dir)
    assert weights(target).keys() == weights(random_model).keys()
    assert all(torch.equal(v, weights(random_model)[k]) for k, v in weights(target).items())
    assert (target.config.sharpen, target.config.flip_average) == (1.0, True)
    wider = HidingNetwork(dataclasses.replace(random_model.config, base_channels=16))
    with pytest.raises(ConfigError, match="differs"):
        init_weights(wider, model_dir)


def test_strength_head_is_fitted_on_training_covers_and_gamma_chosen_on_validation(tmp_path, cache_dir):
    """fit_strength_head.py on the shipped model: a head that reads the EN's hard faces, γ from the validation replay."""
    import dataclasses

    from featdeid.model import StrengthHead
    from featdeid.weights import load_safetensors
    from training.train import init_weights

    cfg_path = _tiny_config(tmp_path, cache_dir, covers=90, val=0.25)
    model = tmp_path / "model"
    shutil.copytree(REPO / "featdeid" / "default_model", model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    script = str(REPO / "training" / "fit_strength_head.py")
    base = [sys.executable, script, "--config", str(cfg_path), "--model", str(model), "--covers", "60",
            "--gammas", "0,0.1,0.2"]
    _run([*base, "--out", str(tmp_path / "dry")])
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # nothing written without --write
    report = json.loads((tmp_path / "dry" / "strength_head.json").read_text())
    assert (tmp_path / "dry" / "strength_head.png").stat().st_size > 1000
    assert report["training_covers"] == 60 and report["validation_covers"] >= 15
    rows = report["rows"]
    assert [r["gamma"] for r in rows] == [0.0, 0.1, 0.2] and report["chosen_gamma"] in (0.0, 0.1, 0.2)
    assert all(r["psnr"] - 1.645 * r["psnr_se"] >= 30.0 - 1e-3 for r in rows)  # every γ at the same PSNR bound
    assert rows[0]["strength_p10"] == pytest.approx(rows[0]["strength_p90"])  # γ 0: one strength for all
    assert rows[2]["strength_p90"] > rows[2]["strength_p10"] * 1.05
    assert np.isfinite(report["validation_corr"])

    other = json.loads(cfg_path.read_text())
    other["data"]["val_fraction"] = 0.5
    (tmp_path / "other.yaml").write_text(json.dumps(other))
    r = subprocess.run([*base, "--fit-config", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "bad")], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "splits other data" in r.stderr and not (tmp_path / "bad").exists()
    _run([*base, "--gammas", "0.2", "--out", str(tmp_path / "fit"), "--write"])
    fitted = HidingNetwork.from_pretrained(model)
    plain = HidingNetwork.from_pretrained(REPO / "featdeid" / "default_model")
    assert fitted.config.adaptive_strength == 0.2 and fitted.config.default_strength == plain.config.default_strength
    state = load_safetensors(model / "model.safetensors")
    assert state["strength_head.linear.weight"].shape == (1, 256) and state["head.weight"].dtype == torch.float16
    torch.manual_seed(0)
    c = torch.linspace(0.2, 1.0, 6)[:, None, None, None] * torch.rand(6, 3, 128, 128)  # inputs that differ in kind
    e = plain.identity_bank[:6]
    with torch.inference_mode():
        ratio = (fitted.residual(c, e).flatten(1).norm(dim=1) / plain.residual(c, e).flatten(1).norm(dim=1))
    assert ratio.min() >= np.exp(-0.2 * StrengthHead.LIMIT) - 1e-4 and ratio.max() <= np.exp(0.2 * StrengthHead.LIMIT) + 1e-4
    assert ratio.std() > 1e-3  # faces get different strengths
    target = HidingNetwork(dataclasses.replace(plain.config, adaptive_strength=0.0))
    init_weights(target, model)  # a fitted model still seeds a training run (its head is left out)
    assert target.strength_head is None
