"""featdeid.loading.load against a real local Hub server (tests/hubserver.py), the cache and offline mode.

Hub scenarios run in a subprocess each, so ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``
take effect when huggingface_hub is imported. No mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from featdeid.config import ModelConfig
from featdeid.errors import ConfigError, ModelNotFoundError, UnsafeWeightsError
from featdeid.loading import default_model_path, load
from featdeid.model import HidingNetwork

try:
    from tests.hubserver import HubServer
except ImportError:
    from hubserver import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(image_size=32, feature_dim=32, base_channels=8, channel_mults=(1, 2), groups=4)
REPO = "featdeid-test/tiny"

RUNNER = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from featdeid.errors import FeatdeidError
from featdeid.loading import default_model_path, load

torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
try:
    model = load(*spec["args"], **spec["kwargs"])
except FeatdeidError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(0)
if spec["inputs"]:
    x = load_file(spec["inputs"])
else:  # inputs of the loaded model's own size (the packaged default)
    torch.manual_seed(0)
    s, d = model.config.image_size, model.config.feature_dim
    x = {"cover": torch.rand(1, 3, s, s), "feature": torch.nn.functional.normalize(torch.randn(1, d), dim=1)}
with torch.no_grad():
    out = model(x["cover"], x["feature"])
save_file({"out": out}, spec["output"])
default = default_model_path()
print(json.dumps({
    "identities": int(model.identity_bank.shape[0]),
    "training": model.training,
    "default": None if default is None else str(default),
    "max_change": float((out - x["cover"]).abs().max()),
}))
"""


def make_model(seed: int) -> HidingNetwork:
    """A tiny hiding network with random (non-identity) weights and a 5-entry identity bank."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(5, CFG.feature_dim, generator=g), dim=1)
    model = HidingNetwork(CFG, identity_bank=bank)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def outputs(model: HidingNetwork, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(inputs["cover"], inputs["feature"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loading")


@pytest.fixture(scope="module")
def inputs(work: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {"cover": torch.rand(2, 3, 32, 32, generator=g), "feature": torch.randn(2, CFG.feature_dim, generator=g)}
    save_file(x, work / "inputs.safetensors")
    return x


@pytest.fixture(scope="module")
def models(work: Path, inputs: dict[str, torch.Tensor]) -> dict[str, tuple[Path, torch.Tensor]]:
    """Two versions of the model, saved as folders, with their outputs on ``inputs``."""
    result = {}
    for name, seed in (("v1", 1), ("v2", 2)):
        model = make_model(seed)
        folder = model.save_pretrained(work / name, card=f"# tiny featdeid test model {name}\n")
        result[name] = (folder, outputs(model, inputs))
    assert not torch.equal(result["v1"][1], result["v2"][1])
    assert not torch.equal(result["v1"][1], inputs["cover"])
    return result


@pytest.fixture(scope="module")
def hub(work: Path, models: dict[str, tuple[Path, torch.Tensor]]) -> Iterator[HubServer]:
    server = HubServer(work / "hub")
    server.publish(REPO, models["v1"][0], branch="v1")
    server.publish(REPO, models["v2"][0])
    server.publish("featdeid-test/uncached", models["v1"][0])
    no_model = work / "no-model"
    no_model.mkdir()
    (no_model / "config.json").write_text((models["v1"][0] / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, no_model / "pytorch_model.bin")
    server.publish("featdeid-test/no-model", no_model)
    pickled = work / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((models["v1"][0] / "config.json").read_text())
    torch.save(make_model(3).state_dict(), pickled / "model.safetensors")
    server.publish("featdeid-test/pickled", pickled)
    with server:
        yield server


@pytest.fixture(scope="module")
def cache(work: Path) -> Path:
    return work / "hf-cache"


def run_load(
    work: Path, endpoint: str, cache: Path, *args: object, offline: bool = False, own_inputs: bool = False, **kwargs: object
) -> tuple[dict, torch.Tensor | None]:
    """``load(*args, **kwargs)`` in a fresh interpreter; returns its JSON report and the outputs
    (on the module's test inputs, or with ``own_inputs`` on random inputs of the loaded model's size)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env |= {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(work / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": "1",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    output = work / "output.safetensors"
    output.unlink(missing_ok=True)
    spec = {"args": args, "kwargs": kwargs, "inputs": None if own_inputs else str(work / "inputs.safetensors"), "output": str(output)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, (load_file(output)["out"] if output.exists() else None)


def hub_load(
    work: Path, hub: HubServer, cache: Path, *args: object, **kwargs: object
) -> tuple[dict, torch.Tensor | None]:
    return run_load(work, hub.endpoint, cache, *args, **kwargs)


@pytest.fixture(scope="module")
def downloaded(work: Path, hub: HubServer, cache: Path) -> dict[str, tuple[dict, torch.Tensor | None, list]]:
    """Download ``main``, the ``v1`` commit (into ``cache``) and branch ``v1``, recording the requests of each."""
    result = {}
    scenarios = (
        ("main", cache, {}),
        ("pinned", cache, {"revision": hub.refs[REPO]["v1"]}),
        ("branch", work / "hf-cache-branch", {"revision": "v1"}),
    )
    for name, where, kwargs in scenarios:
        hub.clear_log()
        report, out = hub_load(work, hub, where, REPO, **kwargs)
        result[name] = (report, out, list(hub.requests))
    return result


def test_download_matches_original(downloaded: dict, models: dict, hub: HubServer, cache: Path) -> None:
    report, out, requests = downloaded["main"]
    assert "error" not in report, report
    assert report["identities"] == 5 and report["training"] is False
    assert out is not None and torch.equal(out, models["v2"][1])
    commit = hub.refs[REPO]["main"]
    heads = [path for method, path in requests if method == "HEAD"]
    assert heads == [f"/{REPO}/resolve/main/config.json", f"/{REPO}/resolve/{commit}/model.safetensors"]
    hub_files = {path.rsplit("/", 1)[-1] for _, path in requests if not path.startswith("cdn:")}
    assert hub_files == {"config.json", "model.safetensors"}
    cdn = [path for _, path in requests if path.startswith("cdn:")]
    assert cdn and all(path.startswith("cdn:/lfs/") for path in cdn), "safetensors must come via the LFS redirect"
    snapshot = cache / "models--featdeid-test--tiny" / "snapshots" / hub.refs[REPO]["main"]
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]


def test_pinned_commit(downloaded: dict, models: dict, hub: HubServer, cache: Path) -> None:
    report, out, requests = downloaded["pinned"]
    assert "error" not in report, report
    assert out is not None and torch.equal(out, models["v1"][1])
    assert all(hub.refs[REPO]["v1"] in path for _, path in requests if not path.startswith("cdn:"))


def test_branch_revision_pins_one_commit(downloaded: dict, models: dict, hub: HubServer) -> None:
    report, out, requests = downloaded["branch"]
    assert "error" not in report, report
    assert out is not None and torch.equal(out, models["v1"][1])
    heads = [path for method, path in requests if method == "HEAD"]
    assert heads == [f"/{REPO}/resolve/v1/config.json", f"/{REPO}/resolve/{hub.refs[REPO]['v1']}/model.safetensors"]


def test_wrong_revision(work: Path, hub: HubServer, tmp_path: Path) -> None:
    report, _ = hub_load(work, hub, tmp_path, REPO, revision="v9.9")
    assert report["error"] == "ModelNotFoundError"
    assert "revision 'v9.9' not found" in report["message"] and REPO in report["message"]


def test_missing_repo(work: Path, hub: HubServer, tmp_path: Path) -> None:
    report, _ = hub_load(work, hub, tmp_path, "featdeid-test/does-not-exist")
    assert report["error"] == "ModelNotFoundError"
    assert "'featdeid-test/does-not-exist' not found" in report["message"]


def test_repo_without_model(work: Path, hub: HubServer, tmp_path: Path) -> None:
    hub.clear_log()
    report, _ = hub_load(work, hub, tmp_path, "featdeid-test/no-model")
    assert report["error"] == "ModelNotFoundError"
    assert "holds no featdeid model" in report["message"] and "model.safetensors" in report["message"]
    assert not any(path.endswith(".bin") for _, path in hub.requests)


def test_pickle_on_hub(work: Path, hub: HubServer, tmp_path: Path) -> None:
    report, _ = hub_load(work, hub, tmp_path, "featdeid-test/pickled")
    assert report["error"] == "UnsafeWeightsError" and "pickle" in report["message"]


def test_endpoint_not_a_hub(work: Path, hub: HubServer, tmp_path: Path) -> None:
    report, _ = run_load(work, hub.endpoint + "/not-a-hub", tmp_path, REPO)
    assert report["error"] == "ModelNotFoundError"
    assert "could not download" in report["message"] and "not in the local cache" in report["message"]


def test_offline_uses_cache(downloaded: dict, work: Path, hub: HubServer, cache: Path, models: dict) -> None:
    hub.clear_log()
    report, out = hub_load(work, hub, cache, REPO, offline=True)
    assert "error" not in report, report
    assert out is not None and torch.equal(out, models["v2"][1])
    report, out = hub_load(work, hub, cache, REPO, offline=True, revision=hub.refs[REPO]["v1"])
    assert out is not None and torch.equal(out, models["v1"][1])
    report, _ = hub_load(work, hub, cache, "featdeid-test/uncached", offline=True)
    assert report["error"] == "ModelNotFoundError"
    assert "HF_HUB_OFFLINE" in report["message"] and str(cache) in report["message"]
    assert hub.requests == []


def test_local_files_only_argument(downloaded: dict, work: Path, hub: HubServer, cache: Path) -> None:
    hub.clear_log()
    report, _ = hub_load(work, hub, cache, "featdeid-test/uncached", local_files_only=True)
    assert report["error"] == "ModelNotFoundError" and "local_files_only" in report["message"]
    assert hub.requests == []


def test_default_model(work: Path, tmp_path: Path) -> None:
    report, _ = run_load(work, "http://127.0.0.1:9", tmp_path, offline=True, own_inputs=True)
    if default_model_path() is None:
        assert report["error"] == "ModelNotFoundError"
        assert "no default model" in report["message"].lower()
        assert "repo id" in report["message"]
    else:
        assert "error" not in report, report
        assert report["identities"] > 0 and report["default"] == str(default_model_path())
        assert report["max_change"] > 0.01  # a trained model, not an identity map


def test_local_folder(models: dict, inputs: dict) -> None:
    folder, expected = models["v1"]
    for ref in (folder, str(folder)):
        model = load(ref)
        assert not model.training
        assert torch.equal(outputs(model, inputs), expected)
    with pytest.raises(ConfigError, match="revision"):
        load(folder, revision="main")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load(folder / "model.safetensors")


@pytest.mark.parametrize("ref", ["not a repo id!", "a/b/c", "", "./no-such-folder", "owner/na..me", "~nobody/x"])
def test_invalid_reference(ref: str) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing model folder nor a Hub repo id|empty"):
        load(ref)


def test_missing_path_object(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing model folder"):
        load(tmp_path / "owner" / "name")


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        load(tmp_path)


@pytest.fixture
def copy(models: dict, tmp_path: Path) -> Path:
    src = models["v1"][0]
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    return tmp_path


def test_pickle_named_safetensors(copy: Path) -> None:
    torch.save(make_model(4).state_dict(), copy / "model.safetensors")
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load(copy)


def test_truncated_safetensors(copy: Path) -> None:
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UnsafeWeightsError):
        load(copy)


def test_tampered_safetensors_header(copy: Path) -> None:
    data = bytearray((copy / "model.safetensors").read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len // 2] = ord("}")
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UnsafeWeightsError):
        load(copy)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "{not json",
        "[1, 2, 3]",
        b"\xff\xfe\x00garbage",
    ],
)
def test_bad_config(copy: Path, text: str | bytes | None) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    if text is None:
        (copy / "config.json").write_text(json.dumps({**cfg, "surprise": 1}))
    elif isinstance(text, bytes):
        (copy / "config.json").write_bytes(text)
    else:
        (copy / "config.json").write_text(text)
    with pytest.raises(ConfigError):
        load(copy)


def run_publish(
    work: Path, *args: str, endpoint: str = "http://127.0.0.1:9", token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env |= {
        "HF_HOME": str(work / "hf-home"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, str(REPO_ROOT / "hub" / "publish.py"), *args]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)


def test_publish_requires_token_and_valid_folder(work: Path, models: dict, tmp_path: Path) -> None:
    proc = run_publish(work, str(models["v1"][0]), "--repo-id", "owner/name")
    assert proc.returncode != 0 and "token is required" in proc.stderr
    proc = run_publish(work, str(tmp_path), "--repo-id", "owner/name", "--token", "hf_x")
    assert proc.returncode != 0 and "lacks config.json, model.safetensors, README.md" in proc.stderr


def test_publish_roundtrip(work: Path, hub: HubServer, models: dict, tmp_path: Path) -> None:
    repo = "featdeid-test/published"
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (folder / name).write_bytes((models["v1"][0] / name).read_bytes())
    (folder / "optimizer.bin").write_bytes(b"not for the Hub")
    card = 'model = featdeid.load("OWNER/featdeid-default")  # this repo\n'
    (folder / "README.md").write_text(card)
    proc = run_publish(work, str(folder), "--repo-id", repo, "--token", "hf_test", endpoint=hub.endpoint)
    assert proc.returncode == 0, proc.stderr
    commit = hub.refs[repo]["main"]
    assert commit in proc.stdout
    files = hub.files(repo, commit)
    assert sorted(files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert files["README.md"].decode() == f'model = featdeid.load("{repo}")  # this repo\n'
    assert (folder / "README.md").read_text() == card
    report, out = hub_load(work, hub, tmp_path / "cache", repo, revision=commit)
    assert "error" not in report, report
    assert out is not None and torch.equal(out, models["v1"][1])

    proc = run_publish(
        work, str(folder), "--repo-id", repo, "--revision", "candidate", endpoint=hub.endpoint, token="hf_env"
    )
    assert proc.returncode == 0, proc.stderr
    assert hub.refs[repo]["candidate"] != commit and hub.refs[repo]["main"] == commit
