"""Evaluation harness: the paper's protocol (Hanawa, Ito & Aoki 2024, sections 4.3, 4.8, 4.9).

Modules:

- :mod:`.metrics` PSNR, SSIM, LPIPS (AlexNet) between C and D
- :mod:`.verification` threshold selection, accuracy, ASR (1:1)
- :mod:`.identification` ranks, CMC, Rank-1 / Rank-5 (1:N)
- :mod:`.attacks` image-processing attacks on D (median, Gaussian, JPEG, bit depth, WebP, resize)
- :mod:`.baselines` methods under test: featdeid, blur, pixelate, solid mask, MIM adversarial
- :mod:`.evaluators` recognisers as evaluators (black-box / white-box), worker process for dlib
- :mod:`.protocol` LFW / CelebA sets, alignment and caches
- :mod:`.runner` the protocol end to end (:func:`evaluate`)
- :mod:`.report` JSON, Markdown and PNG plots
- :mod:`.cli` ``featdeid eval`` / ``python -m featdeid.evaluation``
"""

from .runner import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
