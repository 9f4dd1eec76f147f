"""1:N identification (paper, section 4.3): ranks, CMC curves, Rank-1 / Rank-5.

The protocol splits the images of each person into sets (LFW: three sets of one image per person
for 200 persons); for every ordered pair (input set, registered set) the de-identified input images
are matched against all registered originals. The rank of a query is ``1 +`` the number of
registered identities scoring strictly higher than its own identity (ties are in the query's
favour, i.e. the de-identification's disfavour). The CMC curve gives, for each k, the share of
queries whose rank is at most k, pooled over all combinations (the mean of the per-combination
curves); queries with no embedding (a face no longer detected) never match (rank = infinity).
"""

from __future__ import annotations

import itertools

import numpy as np


def similarity_matrix(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarities ``(Q, G)``; rows of NaN (missing query embeddings) stay NaN."""
    q = np.asarray(queries, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return q @ g.T


def ranks(sim: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank (1-based) of the true gallery column of each query row; ``inf`` for NaN rows.

    Args:
        sim: ``(Q, G)`` similarities.
        truth: ``(Q,)`` index of each query's identity in the gallery.
    """
    sim = np.asarray(sim, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.int64)
    own = sim[np.arange(len(sim)), truth]
    higher = (sim > own[:, None]).sum(1)
    out = (1 + higher).astype(np.float64)
    out[~np.isfinite(own)] = np.inf
    return out


def cmc(rank_values: np.ndarray, max_rank: int) -> np.ndarray:
    """CMC curve: ``out[k-1]`` = share of queries with rank <= k, for k = 1 .. max_rank."""
    r = np.asarray(rank_values, dtype=np.float64)
    if not len(r):
        return np.full(max_rank, np.nan)
    ks = np.arange(1, max_rank + 1)
    return (r[None, :] <= ks[:, None]).mean(1)


def set_combinations(n_sets: int) -> list[tuple[int, int]]:
    """All ordered (input set, registered set) pairs of different sets (3 sets -> 6 combinations)."""
    return list(itertools.permutations(range(n_sets), 2))


def identification(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    valid: np.ndarray | None = None,
    max_rank: int | None = None,
) -> dict[str, object]:
    """Run the set protocol over every ordered (input set, registered set) combination.

    Args:
        query_emb: ``(P, K, D)`` embeddings of the input images (de-identified): person p's image
            in set k at ``[p, k]``; NaN rows for missing embeddings (a face no longer detected).
        gallery_emb: ``(P, K, D)`` embeddings of the registered originals.
        valid: ``(P, K)`` booleans, False where the original image is unusable (no face in the
            original photo); such a person is left out of the combinations that use that image.
        max_rank: CMC length (default: number of persons).
    Returns:
        ``combinations``, ``ranks`` (list per combination), ``cmc`` (pooled over all queries, i.e.
        the mean of the per-combination curves), ``rank1``, ``rank5``, ``per_combination_rank1``,
        ``cmc_mean_rank`` (CMC of each person's rank averaged over the combinations), ``queries``.
    """
    q = np.asarray(query_emb, dtype=np.float64)
    g = np.asarray(gallery_emb, dtype=np.float64)
    p, k = q.shape[:2]
    ok = np.ones((p, k), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    max_rank = max_rank or p
    combos = set_combinations(k)
    per_combo: list[np.ndarray] = []
    person_ranks = np.full((len(combos), p), np.nan)
    for c, (a, b) in enumerate(combos):
        persons = np.flatnonzero(ok[:, a] & ok[:, b])
        r = ranks(similarity_matrix(q[persons, a], g[persons, b]), np.arange(len(persons)))
        per_combo.append(r)
        person_ranks[c, persons] = r
    pooled = np.concatenate(per_combo) if per_combo else np.zeros(0)
    curve = cmc(pooled, max_rank)
    with np.errstate(invalid="ignore"):
        seen = ~np.isnan(person_ranks)
        mean_rank = np.array([person_ranks[seen[:, j], j].mean() for j in range(p) if seen[:, j].any()])
    return {
        "combinations": combos,
        "ranks": per_combo,
        "queries": int(len(pooled)),
        "cmc": curve,
        "rank1": float(curve[0]),
        "rank5": float(curve[min(4, max_rank - 1)]),
        "per_combination_rank1": [float((r <= 1).mean()) if len(r) else float("nan") for r in per_combo],
        "cmc_mean_rank": cmc(mean_rank, max_rank),
    }
