"""One round's statistics pooled over data-parallel replicas (or placement shards), so a DP
run logs and adapts like one run over the global batch, not like DP runs side by side."""
from __future__ import annotations

import math


def _kind(key: str) -> str:
    leaf = key.rsplit("/", 1)[-1]
    if "max" in leaf:
        return "max"
    if "min" in leaf:
        return "min"
    return "std" if leaf == "std" or leaf.endswith("_std") else "mean"


def _pooled_std(parts: list[tuple[float, float, int]]) -> float:
    """Unbiased std of the union of groups given each group's (mean, unbiased std, count)."""
    n = sum(c for _, _, c in parts)
    if n < 2:
        return parts[0][1] if parts else float("nan")
    mean = sum(m * c for m, _, c in parts) / n
    sq = sum((c - 1) * (s * s if c > 1 else 0.0) + c * m * m for m, s, c in parts)
    return math.sqrt(max(sq - n * mean * mean, 0.0) / (n - 1))


def pool_stats(parts: list[tuple[dict, int]]) -> dict:
    """parts: (stats, rollouts) of each replica. Means are weighted by rollouts; keys naming a
    max / min take the max / min; a `std` key is pooled with its `mean` sibling (`reward/std`
    with `reward/mean`) into the std over all rollouts."""
    keys = list(dict.fromkeys(k for stats, _ in parts for k in stats))
    out: dict = {}
    for k in keys:
        have = [(float(stats[k]), n) for stats, n in parts if k in stats]
        kind = _kind(k)
        mean_key = k[: -len("std")] + "mean"
        if kind == "max":
            out[k] = max(v for v, _ in have)
        elif kind == "min":
            out[k] = min(v for v, _ in have)
        elif kind == "std" and all(mean_key in stats for stats, _ in parts):
            out[k] = _pooled_std([(float(stats[mean_key]), float(stats[k]), n) for stats, n in parts])
        else:
            total = sum(n for _, n in have)
            out[k] = sum(v * n for v, n in have) / total if total else float("nan")
    return out
