"""Benchmark: full Hessian spectrum of the default toy models, ours vs the usual recipe.

Side by side in one process, on the default training set (N = 500):

* baseline: ``torch.func.hessian`` of the mean loss over all 500 sequences
  (float64), then ``torch.linalg.eigvalsh``, the usual way to get an exact
  spectrum;
* ours, one epoch at a time: :class:`HessianOperator` on the deduplicated,
  count-weighted set (27 distinct inputs with soft labels; cross-entropy is
  linear in the label distribution, so the loss is the same), assembled by one
  batched backward through the kept gradient graph, and ``exact_spectrum``;
* ours, stacked (what ``HessianTracker`` does by default): ten epochs'
  parameters in one ``HessianOperator.dense_at`` call (``vmap`` over
  ``jacrev(jacrev(L))``), then a batched ``eigvalsh``.

Reports seconds per epoch's spectrum, the speed-ups, and the largest relative
eigenvalue difference (target: >= 10x at <= 1e-6), on the parameters of
epochs 1-10 and 41-50 of a real run. Also reports the projected cost of
per-epoch tracking over 600 epochs.

    python benchmarks/bench_hessian.py
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from loopscape.data.markov import build_task
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.landscape.hessian import HessianOperator, weighted_batches
from loopscape.landscape.linalg import dense_spectrum, exact_spectrum
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.run import seeded


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
    # one epoch at a time: batches built once per run, an operator per epoch
    return exact_spectrum(HessianOperator(model, batches, dtype=torch.float64, cache_graph=True)).eigenvalues


def ours_stacked(model, batches, thetas: torch.Tensor) -> torch.Tensor:
    # as HessianTracker does it by default: ten epochs' parameters in one vectorised call
    H, _ = HessianOperator(model, batches, dtype=torch.float64).dense_at(thetas)
    return dense_spectrum(H).eigenvalues


def timed(fn, repeat: int = 3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def trajectory(model, task, epochs: range) -> list[torch.Tensor]:
    """Flat parameters after each epoch in ``epochs`` (training from where the model is)."""
    thetas = []
    with tempfile.TemporaryDirectory() as d:
        for e in epochs:
            train_markov(model, task, MarkovTrainConfig(epochs=1, checkpoint_every=10**9), f"{d}/{e}", seed=e)
            thetas.append(parameters_to_vector(model.parameters()).detach().clone())
    return thetas


def main() -> None:
    torch.set_num_threads(1)  # as in the study's worker processes; tiny matrices gain nothing from threads
    cfg = MarkovStudyConfig()
    _, task = build_task(cfg.data)
    x, y = task.train.inputs, task.train.targets
    batches = weighted_batches(x, y, dedupe="inputs")
    results = {}
    for name, T in cfg.models.items():
        with seeded(0):
            model = cfg.build_model(T)
        for stage, epochs in (("epochs1-10", range(1, 11)), ("epochs41-50", range(41, 51))):
            if stage == "epochs41-50":
                trajectory(model, task, range(11, 41))
            thetas = trajectory(model, task, epochs)
            tb = to = 0.0
            rel = 0.0
            base = []
            for th in thetas:  # one epoch at a time, both ways
                vector_to_parameters(th, model.parameters())
                t_b, eb = timed(lambda model=model: baseline_spectrum(model, x, y))
                t_o, eo = timed(lambda model=model: ours_spectrum(model, batches))
                tb, to = tb + t_b / len(thetas), to + t_o / len(thetas)
                rel = max(rel, ((eb - eo).abs().max() / eb.abs().max()).item())
                base.append(eb)
            ts, es = timed(
                lambda model=model, thetas=thetas: ours_stacked(model, batches, torch.stack(thetas).double())
            )
            ts /= len(thetas)
            rel_s = max(((eb - e).abs().max() / eb.abs().max()).item() for eb, e in zip(base, es))
            results[f"{name}@{stage}"] = {
                "params": base[0].numel(),
                "baseline_s_per_epoch": round(tb, 4),
                "ours_one_at_a_time_s": round(to, 4),
                "ours_stacked10_s_per_epoch": round(ts, 4),
                "speedup_one_at_a_time": round(tb / to, 1),
                "speedup_stacked10": round(tb / ts, 1),
                "max_rel_eig_diff": float(f"{max(rel, rel_s):.2e}"),
                "tracking_600_epochs_s": round(600 * min(to, ts), 1),
            }
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
