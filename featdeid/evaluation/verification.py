"""1:1 verification (paper, section 4.3): threshold selection, accuracy and the attack success ratio.

Scores are cosine similarities of unit embeddings; a pair is judged "same person" when
``score >= threshold``.

- :func:`best_threshold`: the threshold with the highest accuracy on labelled pairs (the paper:
  all 6,000 LFW View-2 pairs of originals). Ties are broken by the widest margin (the midpoint
  of the best gap between neighbouring scores).
- :func:`kfold_accuracy`: the standard LFW 10-fold figure (threshold chosen on nine folds, accuracy
  on the tenth), reported next to the paper's single-threshold accuracy.
- :func:`attack_success_ratio`: the share of genuine pairs judged different (ASR, paper: pairs
  ``(D1, I2)`` after de-identification; ``(I1, I2)`` for the originals).
"""

from __future__ import annotations

import numpy as np
import torch


def cosine_scores(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays (rows need not be unit length)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The accuracy-maximising threshold on labelled pairs.

    Args:
        scores: ``(N,)`` similarities.
        same: ``(N,)`` booleans, True for genuine pairs.
    Returns:
        ``(threshold, accuracy)``; pairs with ``score >= threshold`` are predicted genuine.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    if s.shape != y.shape or s.ndim != 1 or not len(s):
        raise ValueError(f"need matching non-empty 1-D scores and labels, got {s.shape} and {y.shape}")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    n = len(s)
    # candidate k: threshold between s[k-1] and s[k] -> pairs k.. predicted genuine (k = 0 .. n)
    genuine_at_or_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    impostor_below = np.concatenate([[0], np.cumsum(~y)])
    correct = genuine_at_or_above + impostor_below
    # only split between distinct scores
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]
    correct = np.where(valid, correct, -1)
    best = correct.max()
    cands = np.flatnonzero(correct == best)
    lo = np.concatenate([[s[0] - 1.0], s])[cands]
    hi = np.concatenate([s, [s[-1] + 1.0]])[cands]
    k = int(np.argmax(hi - lo))
    if cands[k] == 0:
        thr = s[0] - 1e-6
    elif cands[k] == n:
        thr = s[-1] + 1e-6
    else:
        thr = 0.5 * (lo[k] + hi[k])
    return float(thr), float(best / n)


def accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Share of pairs classified correctly at ``threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    return float(((s >= threshold) == np.asarray(same, dtype=bool)).mean())


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """LFW-style accuracy: threshold from the other folds, accuracy on each fold; ``(mean, std)``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    f = np.asarray(folds)
    accs = []
    for k in np.unique(f):
        train, test = f != k, f == k
        if not train.any() or not test.any():
            continue
        thr, _ = best_threshold(s[train], y[train])
        accs.append(accuracy(s[test], y[test], thr))
    if not accs:
        return float("nan"), float("nan")
    return float(np.mean(accs)), float(np.std(accs))


def attack_success_ratio(genuine_scores: np.ndarray, threshold: float) -> float:
    """ASR: the share of genuine pairs judged different (``score < threshold``)."""
    s = np.asarray(genuine_scores, dtype=np.float64)
    if not len(s):
        return float("nan")
    return float((s < threshold).mean())


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve (probability a genuine pair outscores an impostor pair; ties count 1/2)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
