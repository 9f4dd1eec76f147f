"""Convert MTCNN's ONet state dict (as shipped in PyPI ``facenet-pytorch``) to ``featdeid/faces/weights/mtcnn_onet.safetensors``.

    pip download --no-deps facenet-pytorch==2.6.0 && unzip -o facenet_pytorch-2.6.0-py3-none-any.whl -d fnp
    python tools/convert_onet.py fnp/facenet_pytorch/data/onet.pt [--check PHOTO]

``onet.pt`` is a plain torch state dict with the keys of :class:`featdeid.faces.onet.ONet`; it is read
with ``torch.load(weights_only=True)`` (no arbitrary unpickling) here only, never at runtime. Weights
are stored in float16 (the network runs in float32). ``--check`` runs facenet-pytorch's own ONet code
(imported from the unzipped wheel next to ``onet.pt``, not installed) with the original float32
weights on the CenterFace faces of a real photo, and compares it with :mod:`featdeid.faces.onet`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import save

from featdeid.faces.onet import WEIGHTS, ONet, load_onet, onet_landmarks
from featdeid.images import atomic_write

SOURCE = "facenet-pytorch 2.6.0 facenet_pytorch/data/onet.pt"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def convert(path: Path) -> dict[str, torch.Tensor]:
    state, ref = read_state(path), ONet().state_dict()
    if set(state) != set(ref):
        raise SystemExit(f"{path}: keys differ from ONet's: {sorted(set(state) ^ set(ref))}")
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise SystemExit(f"{k}: file shape {tuple(v.shape)}, network shape {tuple(ref[k].shape)}")
        if v.abs().max() > 60000:
            raise SystemExit(f"{k}: values beyond float16's range")
    return {k: state[k].half().contiguous() for k in ref}


def reproducible(data: bytes) -> bytes:
    """safetensors writes metadata in (per-process random) hash order: sort it, for a byte-identical file."""
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
    text = json.dumps(head, separators=(",", ":")).encode().ljust(n)
    if len(text) != n:
        raise SystemExit("unexpected safetensors header layout")
    return data[:8] + text + data[8 + n :]


def their_modules(pt: Path):  # noqa: ANN201 - facenet-pytorch's ONet class and detect_face module
    sys.path.insert(0, str(pt.resolve().parents[2]))
    from facenet_pytorch.models.mtcnn import ONet as TheirONet
    from facenet_pytorch.models.utils import detect_face

    return TheirONet, detect_face


def check(pt: Path, weights: Path, photo: Path) -> None:
    from PIL import Image

    from featdeid.faces.detect import detect_faces, order_landmarks

    TheirONet, d = their_modules(pt)
    theirs = TheirONet(pretrained=False)
    theirs.load_state_dict(read_state(pt))
    theirs.eval()
    exact = ONet()
    exact.load_state_dict(read_state(pt))
    ours = load_onet(weights)

    rgb = np.asarray(Image.open(photo).convert("RGB"))
    h, w = rgb.shape[:2]
    boxes = np.array([f.box for f in detect_faces(rgb, "centerface")]).reshape(-1, 4)
    sq = d.rerec(torch.as_tensor(boxes).clone())  # facenet-pytorch clips boxes at the border: keep inner ones
    inside = ((sq[:, 0] >= 1) & (sq[:, 1] >= 1) & (sq[:, 2] <= w) & (sq[:, 3] <= h)).numpy()
    boxes, sq = boxes[inside], sq[inside]
    if not len(boxes):
        raise SystemExit(f"{photo}: no face box fully inside the image")

    # facenet-pytorch's detect_face third stage, verbatim, on these boxes
    imgs = torch.as_tensor(rgb.copy()).permute(2, 0, 1)[None].float()
    y, ey, x, ex = d.pad(sq, w, h)
    im = torch.cat([d.imresample(imgs[:, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]], (48, 48)) for k in range(len(y))])
    im = (im - 127.5) * 0.0078125
    noise = (torch.rand(16, 3, 48, 48, generator=torch.Generator().manual_seed(0)) - 0.5) * 2
    with torch.inference_mode():
        want = theirs(torch.cat([im, noise]))
        for name, net in (("same float32 weights", exact), ("shipped float16 file", ours)):
            got = net(torch.cat([im, noise]))
            diffs = ", ".join(f"{n} {(g - t).abs().max():.2e}" for n, g, t in zip(("box", "landmarks", "prob"), got, want))
            print(f"ONet outputs, {name}: max abs difference {diffs}")
            worst = max(float((g - t).abs().max()) for g, t in zip(got, want))
            if worst > (1e-5 if net is exact else 1e-2):
                raise SystemExit(f"ONet outputs differ from facenet-pytorch's ({name}): {worst:.2e}")
        pts = theirs(im)[1].permute(1, 0)
    w_i, h_i = sq[:, 2] - sq[:, 0] + 1, sq[:, 3] - sq[:, 1] + 1
    px = w_i.repeat(5, 1) * pts[:5, :] + sq[:, 0].repeat(5, 1) - 1
    py = h_i.repeat(5, 1) * pts[5:10, :] + sq[:, 1].repeat(5, 1) - 1
    want_pts = np.stack([order_landmarks(p) for p in torch.stack((px, py)).permute(2, 1, 0).numpy()])
    for name, net in (("same float32 weights", exact), ("shipped float16 file", ours)):
        diff = np.abs(onet_landmarks(rgb, boxes, net) - want_pts).max()
        print(f"landmarks on {len(boxes)} faces, {name}: max abs difference {diff:.2e} px")
        if diff > (1e-3 if net is exact else 0.5):
            raise SystemExit(f"landmarks differ from facenet-pytorch's ({name}): {diff:.2e} px")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pt", type=Path, help="facenet_pytorch/data/onet.pt from the unzipped wheel")
    p.add_argument("--output", type=Path, default=WEIGHTS)
    p.add_argument("--check", type=Path, metavar="PHOTO", help="compare with facenet-pytorch's code on this photo")
    args = p.parse_args()
    print(f"source sha256 {hashlib.sha256(args.pt.read_bytes()).hexdigest()}")
    meta = {"source": SOURCE, "licence": "MIT", "copyright": "Copyright (c) 2019 Timothy Esler"}
    atomic_write(reproducible(save(convert(args.pt), metadata=meta)), args.output)
    load_onet(args.output)  # refuses a file featdeid would not load
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes) sha256 {digest}")
    if args.check:
        check(args.pt, args.output, args.check)


if __name__ == "__main__":
    main()
