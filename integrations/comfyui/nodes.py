"""ComfyUI node: de-identify every face in an IMAGE batch with featdeid.

ComfyUI IMAGE tensors are ``(B, H, W, C)`` float in [0, 1]. Each image goes through
:class:`featdeid.Deidentifier` (the same core as the library and the ``featdeid`` command); pixels
outside faces come back unchanged. Outputs: the de-identified IMAGE and the number of faces
de-identified in the batch (INT).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    from featdeid.faces.detect import available_detectors
except ImportError as e:  # ComfyUI shows this in its log instead of a silent missing node
    raise ImportError("the featdeid nodes need featdeid in ComfyUI's Python: pip install 'featdeid[dlib]'") from e

MAX_SEED = 0xFFFFFFFFFFFFFFFF


class FeatdeidDeidentify:
    """De-identify faces (featdeid)."""

    CATEGORY = "image/privacy"
    FUNCTION = "deidentify"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("image", "faces")
    DESCRIPTION = ("Hides every face's identity from face recognition while the photo still looks the same: "
                   "each face gets the identity feature of a person who does not exist.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05,
                                       "tooltip": "0 = unchanged, 1 = the model's output, more = stronger"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                 "tooltip": "picks the fake identities (faces get different ones)"}),
            },
            "optional": {
                "model": ("STRING", {"default": "", "tooltip": "model folder or Hub repo id; empty: "
                                     "FEATDEID_MODEL, else the model shipped with featdeid"}),
                "detector": (["auto", *available_detectors()], {"default": "auto"}),
            },
        }

    def deidentify(self, image: torch.Tensor, strength: float, seed: int, model: str = "", detector: str = "auto"):
        from featdeid.pipeline import get_deidentifier

        if image.dim() != 4:
            raise ValueError(f"IMAGE must be (B, H, W, C), got shape {tuple(image.shape)}")
        runner = get_deidentifier((model or "").strip() or os.environ.get("FEATDEID_MODEL") or None, detector)
        batch = image.detach().to("cpu", torch.float32).numpy()
        out = np.empty_like(batch)
        faces = 0
        for i, img in enumerate(batch):
            # one seed for the whole batch: the n-th face from the left keeps its fake identity across video frames
            out[i], report = runner(img, strength=float(strength), seed=int(seed), return_report=True)
            faces += report.changed
        return (torch.from_numpy(out).to(image.device, image.dtype), faces)


NODE_CLASS_MAPPINGS = {"FeatdeidDeidentify": FeatdeidDeidentify}
NODE_DISPLAY_NAME_MAPPINGS = {"FeatdeidDeidentify": "De-identify faces (featdeid)"}
