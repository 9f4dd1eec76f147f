"""Hiding network: tiling rule, shapes, config validation, save/load round trips."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from featdeid import images
from featdeid.config import PAPER, SMALL_CPU, ModelConfig, tiling_shape
from featdeid.errors import ConfigError, UnsafeWeightsError
from featdeid.model import HidingNetwork, tile_feature


def test_paper_tiling_rule():
    f = torch.arange(512.0)[None]
    t = tile_feature(f, 256)
    assert t.shape == (1, 3, 256, 256)
    assert torch.equal(t[0, 0, 0], f[0, :256]) and torch.equal(t[0, 0, 1], f[0, 256:])
    assert torch.equal(t[0, 0, 2], f[0, :256]) and torch.equal(t[0, 0, 255], f[0, 256:])
    assert torch.equal(t[0, 0], t[0, 1]) and torch.equal(t[0, 0], t[0, 2])


@pytest.mark.parametrize(
    "d,s,expect",
    [(512, 256, (2, 256, 128)), (512, 128, (4, 128, 32)), (512, 512, (1, 512, 512)), (128, 256, (1, 128, 256)), (512, 1024, (1, 512, 1024))],
)
def test_tiling_generalised(d, s, expect):
    assert tiling_shape(d, s) == expect
    f = torch.randn(2, d)
    t = tile_feature(f, s)
    assert t.shape == (2, 3, s, s)
    flat = t[:, 0].reshape(2, -1)
    assert set(torch.unique(flat[0]).tolist()) == set(f[0].tolist())


@pytest.mark.parametrize("d,s", [(500, 256), (768, 256), (512, 96)])
def test_tiling_refuses_other_pairs(d, s):
    with pytest.raises(ConfigError):
        tiling_shape(d, s)


@pytest.mark.parametrize("cfg", [SMALL_CPU, ModelConfig(image_size=64, base_channels=8, channel_mults=(1, 2), groups=4)])
def test_shapes_and_identity_at_init(cfg):
    m = HidingNetwork(cfg).eval()
    c = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    e = torch.randn(2, cfg.feature_dim)
    with torch.inference_mode():
        d = m(c, e)
    assert d.shape == c.shape
    assert torch.equal(d, c)  # zero-initialised head: an untrained network changes nothing
    with pytest.raises(ValueError):
        m(torch.rand(2, 3, 32, 32), e)


def test_paper_config_is_the_paper_size():
    assert PAPER.image_size == 256 and PAPER.feature_dim == 512
    m = HidingNetwork(PAPER)
    assert m.stem[0].in_channels == 6


@pytest.mark.parametrize(
    "bad",
    [
        dict(image_size=100), dict(channel_mults=()), dict(base_channels=0), dict(feature_dim=500), dict(default_strength=-1),
        dict(image_size="256"), dict(default_strength=True), dict(recogniser=5), dict(frame="other-template"),
        dict(flip_average="yes"), dict(sharpen=-0.5), dict(sharpen="1"), dict(sharpen_sigma=0), dict(sharpen=float("nan")),
        dict(adaptive_strength=-0.1), dict(adaptive_strength=2.0), dict(adaptive_strength="0.1"),
        dict(chroma=-0.5), dict(chroma=5.0), dict(chroma=True), dict(chroma=float("nan")),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**bad)


def test_save_load_round_trip(tmp_path, random_model):
    # its own copy in the default memory layout (the pipeline moves models it runs to channels_last)
    random_model = copy.deepcopy(random_model).to(memory_format=torch.contiguous_format)
    folder = random_model.save_pretrained(tmp_path / "m", card="# card\n")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    umask = images._umask()
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0o600
    loaded = HidingNetwork.from_pretrained(folder)
    c = torch.rand(3, 3, 64, 64)
    e = random_model.identity_bank[:3]
    with torch.inference_mode():
        assert torch.equal(loaded(c, e), random_model(c, e))
    assert torch.equal(loaded.identity_bank, random_model.identity_bank)
    half = HidingNetwork.from_pretrained(random_model.save_pretrained(tmp_path / "h", half=True))
    with torch.inference_mode():
        assert (half(c, e) - random_model(c, e)).abs().max() < 5e-3
    assert torch.equal(half.identity_bank, random_model.identity_bank)  # bank stays float32


def test_flip_average_is_mirror_equivariant_and_travels_with_the_config(tmp_path, random_model):
    flipped = HidingNetwork(dataclasses.replace(random_model.config, flip_average=True), random_model.identity_bank)
    flipped.load_state_dict(random_model.state_dict())
    c = torch.rand(3, 3, 64, 64)
    e = random_model.identity_bank[:3]
    with torch.inference_mode():
        plain = random_model.residual(c, e)
        r = flipped.residual(c, e)
        torch.testing.assert_close(r, 0.5 * (plain + random_model.residual(c.flip(-1), e).flip(-1)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(flipped.residual(c.flip(-1), e), r.flip(-1), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(r, plain, atol=1e-3)  # the random network is not mirror-symmetric
    loaded = HidingNetwork.from_pretrained(flipped.save_pretrained(tmp_path / "f"))
    assert loaded.config.flip_average is True
    with torch.inference_mode():
        assert torch.equal(loaded(c, e), flipped(c, e))
    data = json.loads((random_model.save_pretrained(tmp_path / "p") / "config.json").read_text())
    assert data.pop("flip_average") is False
    assert ModelConfig.from_dict(data).flip_average is False  # configs written before the key load unchanged


def test_unsharp_boosts_fine_detail_and_keeps_smooth_changes():
    from featdeid.model import unsharp

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = (0.01 * xx + 0.02 * yy).expand(2, 3, 32, 32).clone()  # linear ramp: a Gaussian leaves it as is inside
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    torch.testing.assert_close(unsharp(smooth, 1.0, 1.0)[inner], smooth[inner], atol=1e-5, rtol=0)
    checker = ((xx + yy) % 2 * 2 - 1).expand(1, 3, 32, 32) * 0.01  # finest detail: grows by about 1 + amount
    sharp = unsharp(checker, 1.0, 1.0)
    assert 1.8 < (sharp[inner].abs() / checker[inner].abs()).mean() < 2.0
    assert unsharp(checker, 0.0, 1.0) is checker
    assert unsharp(checker.bfloat16(), 1.0, 1.0).dtype == torch.bfloat16
    noise = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(unsharp(noise.contiguous(memory_format=torch.channels_last), 1.0, 1.0), unsharp(noise, 1.0, 1.0))
    with pytest.raises(ValueError, match="too large"):
        unsharp(checker[..., :4, :4], 1.0, 2.0)


def test_sharpen_travels_with_the_config(tmp_path, random_model):
    from featdeid.model import unsharp

    cfg = dataclasses.replace(random_model.config, sharpen=1.0, sharpen_sigma=1.5)
    sharp = HidingNetwork(cfg, random_model.identity_bank)
    sharp.load_state_dict(random_model.state_dict())
    torch.manual_seed(0)
    for p in sharp.head.parameters():  # a non-zero change: the head starts at zero
        torch.nn.init.normal_(p, std=0.05)
    plain = HidingNetwork(random_model.config, random_model.identity_bank)
    plain.load_state_dict(sharp.state_dict())
    c = torch.rand(2, 3, 64, 64)
    e = random_model.identity_bank[:2]
    with torch.inference_mode():
        torch.testing.assert_close(sharp.residual(c, e), unsharp(plain.residual(c, e), 1.0, 1.5))
        assert not torch.allclose(sharp.residual(c, e), plain.residual(c, e), atol=1e-4)
    loaded = HidingNetwork.from_pretrained(sharp.save_pretrained(tmp_path / "s"))
    assert (loaded.config.sharpen, loaded.config.sharpen_sigma) == (1.0, 1.5)
    with torch.inference_mode():
        assert torch.equal(loaded(c, e), sharp(c, e))
    data = json.loads((random_model.save_pretrained(tmp_path / "p") / "config.json").read_text())
    del data["sharpen"], data["sharpen_sigma"]
    assert ModelConfig.from_dict(data).sharpen == 0.0  # configs written before the keys load unchanged


def test_chroma_scales_the_colour_part_of_the_change(tmp_path, random_model):
    from featdeid.model import scale_chroma

    r = torch.randn(2, 3, 16, 16)
    assert scale_chroma(r, 1.0) is r
    grey = scale_chroma(r, 0.0)
    torch.testing.assert_close(grey, r.mean(1, keepdim=True).expand_as(r))
    torch.testing.assert_close(scale_chroma(r, 0.5) - grey, 0.5 * (r - grey))
    assert scale_chroma(r.half(), 0.0).dtype == torch.float16
    cfg = dataclasses.replace(random_model.config, sharpen=1.0, chroma=0.0)
    grey_model = HidingNetwork(cfg, random_model.identity_bank)
    torch.manual_seed(0)
    for p in grey_model.head.parameters():  # a non-zero change: the head starts at zero
        torch.nn.init.normal_(p, std=0.05)
    plain = HidingNetwork(dataclasses.replace(cfg, chroma=1.0), random_model.identity_bank)
    plain.load_state_dict(grey_model.state_dict())
    c, e = torch.rand(2, 3, 64, 64), random_model.identity_bank[:2]
    with torch.inference_mode():
        change, colour = grey_model.residual(c, e), plain.residual(c, e)
        assert change.std(1).max() < 1e-5 and colour.std(1).max() > 1e-3  # brightness only
        torch.testing.assert_close(change, scale_chroma(colour, 0.0))  # after the sharpening
    loaded = HidingNetwork.from_pretrained(grey_model.save_pretrained(tmp_path / "g"))
    assert loaded.config.chroma == 0.0 and loaded.config.reshapings()["chroma"] == 0.0
    data = json.loads((random_model.save_pretrained(tmp_path / "p") / "config.json").read_text())
    del data["chroma"]
    assert ModelConfig.from_dict(data).chroma == 1.0  # configs written before the key load unchanged
    from featdeid.evaluation.baselines import model_fingerprint, state_sha256

    unchanged = state_sha256(random_model.state_dict(), salt=json.dumps(
        {k: v for k, v in random_model.config.to_dict().items() if k not in ("default_strength", "adaptive_strength", "chroma")},
        sort_keys=True).encode())[:16]
    assert model_fingerprint(random_model) == unchanged  # models measured before the field keep their fingerprint
    assert model_fingerprint(grey_model) != model_fingerprint(plain)  # same weights, another change


def test_strength_head_scales_each_face_and_travels_with_the_config(tmp_path, random_model):
    from featdeid.model import StrengthHead

    adaptive = HidingNetwork(dataclasses.replace(random_model.config, adaptive_strength=0.2), random_model.identity_bank)
    missing, unexpected = adaptive.load_state_dict(random_model.state_dict(), strict=False)
    assert sorted(missing) == ["strength_head.linear.bias", "strength_head.linear.weight"] and not unexpected
    c = torch.rand(4, 3, 64, 64)
    e = random_model.identity_bank[:4]
    with torch.inference_mode():
        plain = random_model.residual(c, e)
        torch.testing.assert_close(adaptive.residual(c, e), plain)  # an unfitted head: one strength for all
        torch.manual_seed(1)
        torch.nn.init.normal_(adaptive.strength_head.linear.weight, std=1.0)
        grabbed = []
        hook = adaptive.mid.register_forward_hook(lambda m, i, o: grabbed.append(o))
        r = adaptive.residual(c, e)
        hook.remove()
        z = adaptive.strength_head(grabbed[0])
        assert z.shape == (4,) and z.abs().max() <= StrengthHead.LIMIT and z.std() > 0.1
        torch.testing.assert_close(r, plain * torch.exp(0.2 * z)[:, None, None, None], atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the head reads the face in float32 under autocast too
            torch.testing.assert_close(adaptive.strength_head(grabbed[0].bfloat16()),
                                       adaptive.strength_head(grabbed[0].bfloat16().float()))
    assert random_model.strength_head is None
    assert not any(k.startswith("strength_head") for k in random_model.state_dict())  # older model files load as before
    loaded = HidingNetwork.from_pretrained(adaptive.save_pretrained(tmp_path / "a"))
    assert loaded.config.adaptive_strength == 0.2
    with torch.inference_mode():
        assert torch.equal(loaded(c, e), adaptive(c, e))
    assert loaded.config.fits_weights_of(random_model.config) and random_model.config.fits_weights_of(loaded.config)
    from featdeid.evaluation.baselines import model_fingerprint

    off = HidingNetwork(dataclasses.replace(random_model.config, adaptive_strength=0.0), random_model.identity_bank)
    off.load_state_dict(random_model.state_dict())
    assert model_fingerprint(off) == model_fingerprint(random_model) != model_fingerprint(loaded)


def test_refuses_pickles_and_bad_configs(tmp_path, random_model):
    folder = random_model.save_pretrained(tmp_path / "m")
    torch.save(random_model.state_dict(), folder / "model.safetensors")
    with pytest.raises(UnsafeWeightsError):
        HidingNetwork.from_pretrained(folder)
    folder = random_model.save_pretrained(tmp_path / "n")
    data = json.loads((folder / "config.json").read_text())
    data["__import__"] = "os"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError):
        HidingNetwork.from_pretrained(folder)
