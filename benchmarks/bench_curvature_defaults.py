"""Benchmark (issue 28, section 4): the one-call curvature functions at their defaults, as a new user
calls them, against PyHessian's and hessian-eigenthings' defaults on the same Hugging Face model and data.

The setting is the issue's: a small Llama (213,440 parameters; 3 layers, d = 64, vocabulary 128),
moved off its initialisation by 150 AdamW steps on periodic token rows, then four dict batches of
16 rows x 48 tokens, padded (lengths 24-48, padding labelled -100). Needs the benchmark and hf extras::

    pip install -c constraints.txt -e '.[bench,hf]'
    python benchmarks/bench_curvature_defaults.py            # about 8 minutes on 2 CPU cores
    python benchmarks/bench_curvature_defaults.py --device cuda
    python benchmarks/bench_curvature_defaults.py --parts top   # one comparison: top, trace or density

What each call is:

- top 3 eigenvalues of ``model.layers.2.*`` (65,664 weights): ours ``top_eigenvalues(model, batches,
  k=3, params=...)``; PyHessian ``hessian(...).eigenvalues(top_n=3)`` (power iteration, its
  ``maxIter=100, tol=1e-3``); hessian-eigenthings ``lanczos(HessianOperator(...), k=3)`` (its
  ``max_iter=2k``). Reference: scipy ``eigsh`` to 1e-10 on the reference product.
- trace and spectral density of ``model.layers.2.self_attn.o_proj.weight`` (4,096 weights), where
  the exact spectrum is computed: ours ``hessian_trace`` / ``spectral_density`` at their defaults;
  PyHessian ``trace()`` (Hutchinson, ``maxIter=100, tol=1e-3``) and ``density()``;
  hessian-eigenthings ``trace`` (Hutch++, 100 products) and ``spectral_density`` (10 x 80). Each
  is run for 3 seeds (the traces 10, with ours also at 15 and 30 products); errors and times are means.
- the baselines also at our accuracy, by their own knobs: hessian-eigenthings' Krylov size (as many steps
  as our run took, and 15 more), PyHessian's tolerance (1e-6, up to 1,000 iterations).

The reference product is textbook double backward (``torch.autograd.grad`` twice) of the model's
own ``.loss`` per batch, combined by scored tokens, on a float64 copy with attention on the math
kernel, checked against central finite differences of its gradient and against our float64 product.
(Llama's RMSNorm computes in float32 whatever the model's type, so even the float64 copy is good to
about 1e-8 relative, not 1e-15; that is three orders below the float32 errors judged here.) The baselines are given the
same loss (a documented ``loss_fn`` / criterion: each batch's summed token loss over the mean
tokens per batch, so their average over the equal-sized batches is the token mean), and run under
``sdpa_kernel(MATH)`` where they fail without it (both say so below). Everything is timed end to
end from model and data, side by side in one process; the ratios are what carries to other machines.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from scipy.stats import wasserstein_distance
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopscape.landscape import hessian_operator, hessian_trace, spectral_density, top_eigenvalues
from loopscape.landscape.linalg import lanczos

VOCAB, ROWS, WIDTH, BATCHES = 128, 16, 48, 4
TOP_BLOCK, SMALL_BLOCK = "model.layers.2.*", "model.layers.2.self_attn.o_proj.weight"
SEEDS = (0, 1, 2)
TRACE_SEEDS = tuple(range(10))  # one trace estimate is cheap and noisy: more seeds


def issue_model(device: str, seed: int = 0):
    """The small Llama and its four padded dict batches."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)

    def batch():
        period = torch.randint(3, 9, (ROWS, 1), generator=g)
        ids = torch.gather(torch.randint(3, VOCAB, (ROWS, 8), generator=g), 1, torch.arange(WIDTH)[None] % period)
        mask = (torch.arange(WIDTH)[None] < torch.randint(24, WIDTH + 1, (ROWS, 1), generator=g)).long()
        ids = ids.masked_fill(mask == 0, 2)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [{k: t.to(device) for k, t in batch().items()} for _ in range(BATCHES)]
    return model.to(device).eval(), batches


def scored(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class Reference:
    """Textbook double backward of HF's own loss, combined by scored tokens, on a float64 copy."""

    def __init__(self, model, batches, pattern: str):
        import fnmatch

        self.model = copy.deepcopy(model).double()
        for name, p in self.model.named_parameters():
            p.requires_grad_(fnmatch.fnmatchcase(name, pattern))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = batches
        self.g = self._gradient(create_graph=True)
        self.P = self.g.numel()

    def _gradient(self, create_graph: bool = False) -> torch.Tensor:
        total = sum(scored(b) for b in self.batches)
        with sdpa_kernel(SDPBackend.MATH):
            loss = sum(self.model(**b, use_cache=False).loss * scored(b) / total for b in self.batches)
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph)
        return torch.cat([g.reshape(-1) for g in grads])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.autograd.grad(self.g, self.params, v.to(self.g), retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    def finite_difference_error(self, v: torch.Tensor, eps: float = 1e-4) -> float:
        theta = torch.cat([p.detach().reshape(-1) for p in self.params])

        def gradient_at(t):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(t, self.params)
            return self._gradient()

        fd = (gradient_at(theta + eps * v) - gradient_at(theta - eps * v)) / (2 * eps)
        gradient_at(theta)
        return rel(self.matvec(v), fd)

    def top(self, k: int) -> np.ndarray:
        lin = LinearOperator(
            (self.P, self.P), matvec=lambda v: self.matvec(torch.from_numpy(v.ravel())).cpu().numpy(), dtype="float64"
        )
        return np.sort(eigsh(lin, k=k, which="LA", tol=1e-10, ncv=40, return_eigenvectors=False))[::-1]

    def spectrum(self) -> np.ndarray:
        eye = torch.eye(self.P, dtype=torch.float64, device=self.g.device)
        H = torch.stack([self.matvec(eye[i]) for i in range(self.P)], dim=1)
        return torch.linalg.eigvalsh((H + H.T) / 2).cpu().numpy()


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


# -- the baselines, given the same loss -------------------------------------------------------------------


def block_copy(model, pattern: str):
    """A copy with only ``pattern``'s weights trainable: both baselines take every trainable weight
    (hessian-eigenthings can filter, PyHessian cannot); the copy is made before the clock starts."""
    import fnmatch

    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        p.requires_grad_(fnmatch.fnmatchcase(name, pattern))
    return m


def token_loss(logits, labels, per_batch_tokens: float):
    """A batch's summed next-token loss over the mean scored tokens per batch: averaged over equal-sized
    batches (both baselines average batches) it is the token mean over all batches, the model's loss."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    return nll / per_batch_tokens


class LogitsOf(nn.Module):
    """PyHessian calls ``model(inputs)``: the ids and the mask stacked in one tensor."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(input_ids=x[:, 0], attention_mask=x[:, 1], use_cache=False).logits


def pyhessian_object(model, batches, pattern):
    from pyhessian import hessian

    m = LogitsOf(block_copy(model, pattern))
    per_batch = sum(scored(b) for b in batches) / len(batches)
    loader = [(torch.stack([b["input_ids"], b["attention_mask"]], 1), b["labels"]) for b in batches]
    return lambda: hessian(
        m, lambda out, y: token_loss(out, y, per_batch), dataloader=loader, cuda=batches[0]["labels"].is_cuda
    )


def eigenthings_operator(model, batches, pattern):
    import hessian_eigenthings as he

    m = block_copy(model, pattern)
    per_batch = sum(scored(b) for b in batches) / len(batches)

    def loss_fn(model, batch):
        return token_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"], per_batch)

    return lambda: he.HessianOperator(m, batches, loss_fn, param_filter=he.match_names(pattern))


def runs_as_called(make, call) -> str:
    """Whether the baseline runs with the default attention kernel, or the first line of its error."""
    try:
        call(make())
        return "runs"
    except Exception as err:
        return first_line(err)


# -- the three questions ---------------------------------------------------------------------------------


def top_runs(model, batches, reference: np.ndarray) -> dict:
    def err(eig):
        eig = np.sort(np.asarray(eig, dtype=np.float64))[::-1][: len(reference)]
        return float(np.max(np.abs(eig - reference) / np.abs(reference)))

    out = {}
    s, eig = timed(lambda: top_eigenvalues(model, batches, k=3, params=TOP_BLOCK, verbose=False))
    # the products it took: the same run (same operator, start and rule) once more through the parts, untimed
    again = lanczos(hessian_operator(model, batches, params=TOP_BLOCK), k=3, tol=1e-5)
    assert torch.equal(again.eigenvalues, eig)
    out["ours"] = {"s": s, "products": again.iterations, "eig": eig.tolist(), "error": err(eig)}
    import hessian_eigenthings as he

    make_he, make_ph = eigenthings_operator(model, batches, TOP_BLOCK), pyhessian_object(model, batches, TOP_BLOCK)
    out["hessian-eigenthings as called"] = runs_as_called(make_he, lambda H: H.matvec(torch.randn(H.size)))
    with sdpa_kernel(SDPBackend.MATH):
        torch.manual_seed(0)
        s, res = timed(lambda: he.lanczos(make_he(), k=3, seed=0))
        eig = res.eigenvalues.double().cpu().numpy()
        out["hessian-eigenthings"] = {"s": s, "products": res.iterations, "eig": eig.tolist(), "error": err(eig)}
        torch.manual_seed(0)
        s, (eig, _) = timed(lambda: make_ph().eigenvalues(top_n=3))
        out["pyhessian"] = {"s": s, "eig": list(eig), "error": err(eig)}
    out["pyhessian as called"] = runs_as_called(make_ph, lambda h: h.eigenvalues(top_n=1, maxIter=1))
    # the baselines at our accuracy, by their own knobs: hessian-eigenthings' Krylov size (re-orthogonalised, as
    # ours), PyHessian's tolerance
    with sdpa_kernel(SDPBackend.MATH):
        for steps in (out["ours"]["products"], out["ours"]["products"] + 15):
            s, res = timed(lambda steps=steps: he.lanczos(make_he(), k=3, max_iter=steps, reorthogonalize=True, seed=0))
            eig = res.eigenvalues.double().cpu().numpy()
            out[f"hessian-eigenthings, max_iter={steps}"] = {"s": s, "products": steps, "error": err(eig)}
        torch.manual_seed(0)
        s, (eig, _) = timed(lambda: make_ph().eigenvalues(top_n=3, tol=1e-6, maxIter=1000))
        out["pyhessian, tol=1e-6, maxIter=1000"] = {"s": s, "error": err(eig)}
    return out


def trace_runs(model, batches, exact_trace: float) -> dict:
    import hessian_eigenthings as he

    def ours(n_matvecs):
        return lambda seed: (
            hessian_trace(model, batches, params=SMALL_BLOCK, seed=seed, n_matvecs=n_matvecs, verbose=False).trace
        )

    make_he, make_ph = eigenthings_operator(model, batches, SMALL_BLOCK), pyhessian_object(model, batches, SMALL_BLOCK)
    methods = {
        "ours": ours(60),  # the default
        "ours, n_matvecs=30": ours(30),
        "ours, n_matvecs=15": ours(15),
        "hessian-eigenthings": lambda seed: he.trace(make_he(), seed=seed).estimate,
        "pyhessian": lambda seed: float(np.mean(make_ph().trace())),
    }
    error = lambda est: abs(est - exact_trace) / abs(exact_trace)  # noqa: E731
    return averaged(methods, error, "relative_error", seeds=TRACE_SEEDS)


def density_runs(model, batches, exact: np.ndarray) -> dict:
    import hessian_eigenthings as he

    def ours(seed):
        return spectral_density(model, batches, params=SMALL_BLOCK, seed=seed, verbose=False).measure()

    make_he, make_ph = eigenthings_operator(model, batches, SMALL_BLOCK), pyhessian_object(model, batches, SMALL_BLOCK)

    def eigenthings(seed):
        r = he.spectral_density(make_he(), seed=seed)
        pts, ws = (t.double().reshape(-1).cpu().numpy() for t in (r.raw_eigenvalues, r.raw_weights))
        return pts, ws / r.raw_eigenvalues.shape[0]

    def pyhessian(seed):
        pts, ws = make_ph().density()
        return np.asarray(pts).ravel(), np.asarray(ws).ravel()

    def w1(measure):
        pts, ws = measure
        return float(wasserstein_distance(pts, exact, u_weights=np.clip(ws, 0, None)))

    return averaged({"ours": ours, "hessian-eigenthings": eigenthings, "pyhessian": pyhessian}, w1, "w1_to_exact")


def averaged(methods: dict, error, key: str, seeds=SEEDS) -> dict:
    """Each method once per seed (the baselines draw from the global generator, seeded alike): mean
    seconds and mean error, or the first line of what it raised."""
    out = {}
    for name, fn in methods.items():
        times, errors = [], []
        try:
            for seed in seeds:
                torch.manual_seed(seed)
                with sdpa_kernel(SDPBackend.MATH) if name != "ours" else contextlib.nullcontext():
                    s, result = timed(lambda fn=fn, seed=seed: fn(seed))
                times.append(s)
                errors.append(error(result))
            out[name] = {"s": float(np.mean(times)), key: float(np.mean(errors)), "per_seed": errors}
        except Exception as err:
            out[name] = {"error": first_line(err)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--parts", default="top,trace,density", help="which comparisons (comma-separated)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    model, batches = issue_model(args.device)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {BATCHES} batches", flush=True)
    results: dict = {"device": args.device, "torch": torch.__version__}

    if "top" in parts:
        ref = Reference(model, batches, TOP_BLOCK)
        v = torch.randn(ref.P, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(ref.g.device)
        results["reference_fd_error"] = ref.finite_difference_error(v)
        ours64 = hessian_operator(model, batches, params=TOP_BLOCK, dtype=torch.float64)
        results["ours_float64_vs_reference"] = rel(ours64.matvec(v), ref.matvec(v))
        del ours64
        s, top = timed(functools.partial(ref.top, 3))
        results["reference_top3"] = top.tolist()
        print(
            f"reference top 3 {top} ({s:.0f} s); its product against finite differences "
            f"{results['reference_fd_error']:.1e}, against ours in float64 {results['ours_float64_vs_reference']:.1e}",
            flush=True,
        )
        del ref
        results["top3"] = top_runs(model, batches, top)
        print(json.dumps(results["top3"], indent=1), flush=True)
    if parts & {"trace", "density"}:
        small = Reference(model, batches, SMALL_BLOCK)
        s, exact = timed(small.spectrum)
        results["exact_spectrum"] = {"P": small.P, "min": float(exact.min()), "max": float(exact.max()), "s": s}
        results["exact_trace"] = float(exact.sum())
        print(f"exact spectrum of {small.P} weights in {s:.0f} s: trace {exact.sum():.6g}", flush=True)
        del small
    if "trace" in parts:
        results["trace"] = trace_runs(model, batches, results["exact_trace"])
        print(json.dumps(results["trace"], indent=1), flush=True)
    if "density" in parts:
        results["density"] = density_runs(model, batches, exact)
        print(json.dumps(results["density"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
