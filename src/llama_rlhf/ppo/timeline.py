"""Per-phase timeline of a PPO round: when each rank started and ended each phase.

Every rank records its own spans with the wall clock (`time.time()`, shared by the
processes of one machine and NTP-close across machines); at the end the spans of all ranks
are gathered and rank 0 writes `timeline.json` and `timeline.png` (one row per rank, one bar
per phase), so overlapping phases of a placement are visible at a glance.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from typing import Iterator

import torch

# Fixed colours, so the same phase looks the same in every chart.
COLORS = {"rollout": "#4c72b0", "reference": "#dd8452", "reward": "#c44e52", "values": "#8172b3",
          "exchange": "#bbbbbb", "advantages": "#937860", "actor": "#55a868", "critic": "#da8bc3",
          "sync": "#8c8c8c", "stats": "#dddddd"}


class Timeline:
    """Spans of the current round on this rank: `with tl.span("actor"): ...`."""

    def __init__(self) -> None:
        self.round = 0
        self.events: list[dict] = []

    def start_round(self, number: int) -> None:
        """Forget the previous round; `number` counts from 1, as the metrics' steps do."""
        self.round, self.events = number, []

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.events.append({"phase": phase, "start": start, "end": time.time()})

    def durations(self) -> dict[str, float]:
        """Seconds per phase this round (a phase run several times is summed)."""
        out: dict[str, float] = {}
        for e in self.events:
            out[e["phase"]] = out.get(e["phase"], 0.0) + e["end"] - e["start"]
        return out

    def snapshot(self, rank: int, replica: int, tp_rank: int) -> dict:
        mem, kind = peak_memory_mb()
        return {"rank": rank, "replica": replica, "tp_rank": tp_rank, "round": self.round,
                "events": list(self.events), "peak_memory_mb": mem, "memory_kind": kind}


def peak_memory_mb() -> tuple[float, str]:
    """Peak accelerator memory allocated by this process (CUDA), else its peak RSS (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # Linux: KiB


def to_json(snapshots: list[dict], strategy: str, placement: str = "") -> dict:
    """Times relative to the earliest start over all ranks, so rows line up."""
    t0 = min((e["start"] for s in snapshots for e in s["events"]), default=0.0)
    ranks = []
    for s in sorted(snapshots, key=lambda s: s["rank"]):
        events = [{"phase": e["phase"], "start": round(e["start"] - t0, 6), "end": round(e["end"] - t0, 6)}
                  for e in s["events"]]
        ranks.append({**s, "events": events})
    end = max((e["end"] for r in ranks for e in r["events"]), default=0.0)
    return {"strategy": strategy, "placement": placement, "round": ranks[0]["round"] if ranks else 0,
            "round_time": end, "ranks": ranks}


def write(run_dir: str, snapshots: list[dict], strategy: str, placement: str = "") -> dict:
    """`run_dir/timeline.json` and `run_dir/timeline.png`; returns the JSON data."""
    data = to_json(snapshots, strategy, placement)
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, "timeline.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "timeline.json"))
    plot(data, os.path.join(run_dir, "timeline.png"))
    return data


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = data["ranks"]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(ranks) + 1.2))
    seen: dict[str, str] = {}
    for row, r in enumerate(ranks):
        for e in r["events"]:
            color = COLORS.get(e["phase"], "#333333")
            seen[e["phase"]] = color
            ax.broken_barh([(e["start"], max(e["end"] - e["start"], 1e-4))], (row - 0.4, 0.8),
                           facecolors=color, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(ranks)), [f"rank {r['rank']} (replica {r['replica']})" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the round started")
    ax.set_title(f"{data['strategy']}: round {data['round']} ({data['round_time']:.2f} s)")
    ax.legend(handles=[Patch(color=c, label=p) for p, c in seen.items()], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
