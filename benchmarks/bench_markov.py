"""Benchmark: wall time of the default `loopscape markov` (2 models x 5 seeds x 600 epochs).

Target (issue 2): under 3 minutes on the 2-core CI machine. Also times one
epoch of each model in-process, side by side, so the cost ratio Looped-Attn /
Single-Attn is visible apart from process start-up.

    python benchmarks/bench_markov.py            # full default run
    python benchmarks/bench_markov.py --epochs 60  # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import looped_attn, single_attn
from loopscape.training.markov import MarkovTrainConfig, train_markov


def per_epoch_seconds(model, epochs: int = 20) -> float:
    torch.set_num_threads(1)
    _, task = build_task(MarkovDataConfig())
    with tempfile.TemporaryDirectory() as d:
        rows = train_markov(model, task, MarkovTrainConfig(epochs=epochs, checkpoint_every=10**9), d, seed=0)
    return sum(r["time_s"] for r in rows[1:]) / epochs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=600)
    args = ap.parse_args()
    s, lp = per_epoch_seconds(single_attn()), per_epoch_seconds(looped_attn(n_loops=3))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "loopscape.cli", "markov", "-o", f"{d}/run", "--epochs", str(args.epochs), "-q"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
    result = {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "markov_default_wall_s": round(wall, 1),
        "target_s": 180,
        "train_epoch_s": {
            "single_attn": round(s, 5),
            "looped_attn": round(lp, 5),
            "ratio_looped_over_single": round(lp / s, 2),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
