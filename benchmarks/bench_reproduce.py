"""Benchmark: wall time of `loopscape reproduce` (issue 5: under 10 minutes with
defaults, `--quick` under 1 minute, on the 2-core CI machine), per part, and the
population trainer against training the SHIFT study's members one by one.

    python benchmarks/bench_reproduce.py            # defaults and --quick
    python benchmarks/bench_reproduce.py --quick    # --quick only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loopscape.data.markov import build_task
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.experiments.shift import ShiftStudyConfig
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.population import train_population
from loopscape.training.run import seeded


def run(args: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "loopscape.cli", "reproduce", "-o", f"{d}/out", "-q", *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        return wall, json.loads(Path(d, "out", "report.json").read_text())["timings_s"]


def population_vs_one_by_one(epochs: int = 30) -> dict:
    """One seed's SHIFT members (every policy), trained together and one by one, 1 thread."""
    torch.set_num_threads(1)
    cfg, shift = MarkovStudyConfig(), ShiftStudyConfig()
    _, task = build_task(cfg.data)
    tc = MarkovTrainConfig(epochs=epochs, checkpoint_every=10**9)
    policies = shift.policies()

    def models():
        out = []
        for _ in policies:
            with seeded(0):
                out.append(cfg.build_model(1))
        return out

    torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)]
    )  # the first optimiser imports torch._dynamo (~2 s): not either side's cost
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        schedules = [shift.shift_config(p, o, 3).build() for p, o in policies]
        train_population(models(), [0] * len(policies), schedules, task, tc, f"{d}/pop")
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k, (m, (p, o)) in enumerate(zip(models(), policies)):
            train_markov(m, task, tc, f"{d}/m{k}", seed=0, schedule=shift.shift_config(p, o, 3).build())
        alone = time.perf_counter() - t0
    return {
        "members": len(policies),
        "epochs": epochs,
        "together_s": together,
        "one_by_one_s": alone,
        "ratio": alone / together,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="time --quick only")
    args = ap.parse_args()
    wall, parts = run(["--quick"])
    print(
        f"loopscape reproduce --quick: {wall:.1f} s (target < 60 s); parts "
        f"{json.dumps({k: round(v, 1) for k, v in parts.items()})}"
    )
    if args.quick:
        return
    p = population_vs_one_by_one()
    print(
        f"SHIFT study, {p['members']} members x {p['epochs']} epochs, 1 thread: together {p['together_s']:.1f} s, "
        f"one by one {p['one_by_one_s']:.1f} s ({p['ratio']:.2f}x)"
    )
    wall, parts = run([])
    print(
        f"loopscape reproduce (defaults): {wall:.1f} s (target < 600 s); parts "
        f"{json.dumps({k: round(v, 1) for k, v in parts.items()})}"
    )


if __name__ == "__main__":
    main()
