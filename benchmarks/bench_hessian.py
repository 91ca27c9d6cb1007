"""Benchmark: full Hessian spectrum of the default toy models, ours vs the usual recipe.

Side by side in one process, on the default training set (N = 500):

* baseline: ``torch.func.hessian`` of the mean loss over all 500 sequences
  (float64), then ``torch.linalg.eigvalsh``, the usual way to get an exact
  spectrum;
* ours: :class:`HessianOperator` on the deduplicated, count-weighted set
  (27 distinct inputs with soft labels; cross-entropy is linear in the
  label distribution, so the loss is the same), assembled by one batched
  backward through the kept gradient graph, and ``exact_spectrum``.

Reports seconds per spectrum, the speed-up, and the largest relative
eigenvalue difference (target: >= 10x at <= 1e-6), at initialisation and
after 50 epochs of training. Also reports the projected cost of per-epoch
tracking over 600 epochs.

    python benchmarks/bench_hessian.py
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from loopscape.experiments.markov import MarkovStudyConfig, build_task
from loopscape.landscape.hessian import HessianOperator, weighted_batches
from loopscape.landscape.linalg import exact_spectrum
from loopscape.training.trainer import TrainConfig, seeded, train


def baseline_spectrum(model, x, y) -> torch.Tensor:
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    buffers = {n: b.double() for n, b in model.named_buffers()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        parts = dict(zip(names, [t.view(s) for t, s in zip(flat.split(sizes), shapes)]))
        return F.cross_entropy(functional_call(model, {**buffers, **parts}, (x,)), y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.linalg.eigvalsh(hessian(loss)(flat))


def ours_spectrum(model, batches) -> torch.Tensor:
    # as HessianTracker does it: batches built once per run, an operator per epoch
    return exact_spectrum(HessianOperator(model, batches, dtype=torch.float64, cache_graph=True)).eigenvalues


def timed(fn, repeat: int = 3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    torch.set_num_threads(1)  # as in the study's worker processes; tiny matrices gain nothing from threads
    cfg = MarkovStudyConfig()
    _, task = build_task(cfg.data)
    x, y = task.train.inputs, task.train.targets
    batches = weighted_batches(x, y, dedupe="inputs")
    results = {}
    for name, T in cfg.models.items():
        with seeded(0):
            model = cfg.model.build(cfg.data.vocab_size, T)
        for stage in ("init", "epoch50"):
            if stage == "epoch50":
                with tempfile.TemporaryDirectory() as d:
                    train(model, task, TrainConfig(epochs=50, checkpoint_every=10**9), d, seed=0)
            tb, eb = timed(lambda: baseline_spectrum(model, x, y))
            to, eo = timed(lambda: ours_spectrum(model, batches))
            rel = ((eb - eo).abs().max() / eb.abs().max()).item()
            results[f"{name}@{stage}"] = {
                "params": eb.numel(),
                "baseline_s": round(tb, 4),
                "ours_s": round(to, 4),
                "speedup": round(tb / to, 1),
                "max_rel_eig_diff": float(f"{rel:.2e}"),
                "tracking_600_epochs_s": round(600 * to, 1),
            }
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
