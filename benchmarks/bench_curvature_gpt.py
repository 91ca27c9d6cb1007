"""Benchmark (issue 18): top-5 Hessian eigenvalues and the SLQ spectral density of a GPT block
model, ours against the libraries users pick today:

- curvlinops 3.x: ``HessianLinearOperator`` + scipy ``eigsh`` (ARPACK); its density is
  Papyan's Lanczos spectrum (``lanczos_approximate_spectrum``);
- hessian-eigenthings 1.0: ``HessianOperator`` + ``lanczos``; ``spectral_density`` (SLQ);
- PyHessian 0.1: ``hessian.eigenvalues`` (deflated power iteration); ``hessian.density``.

Needs the benchmark extra (``pip install -c constraints.txt -e '.[bench]'``) and curvlinops,
installed without its dependencies (docs/curvature.md)::

    python benchmarks/bench_curvature_gpt.py --d 128
    python benchmarks/bench_curvature_gpt.py --d 256
    python benchmarks/bench_curvature_gpt.py --d 128 --device cuda   # on a GPU

Accuracy is judged against a trusted reference, never against us:

- the reference product is textbook double backward (``torch.autograd.grad`` twice) on a float64
  copy of the model, attention on the math kernel, itself checked against central finite
  differences of the float64 gradient;
- the reference top-5 is ARPACK on the reference product to 1e-10;
- every library's own product is compared with the reference on one random vector, called as a
  user would (default attention kernels) and on the math kernel: a library that silently takes a
  wrong derivative path through a fused attention kernel shows here;
- densities are compared by their Wasserstein-1 distance to the exact spectrum (``eigvalsh`` of the
  dense reference Hessian) of a smaller block (``--density-d``), where it can be computed.

Speed: each method's own accuracy knob is swept (our tolerance and block size, eigsh's tolerance,
hessian-eigenthings' Krylov size, PyHessian's tolerance; SLQ probes x steps, ours also deflated),
each run timed end to end from model and data (operator construction included): top-5 runs best of
``--repeat``; SLQ runs once per seed (``--seeds``), time and W1 averaged over the seeds, since a
single draw's W1 is noisy. At each baseline run's accuracy, the fastest baseline run at least that
accurate against our fastest run at least that accurate: the ratio of their times. Everything in
one process, side by side.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from scipy.stats import wasserstein_distance
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopscape.landscape.hessian import HessianOperator
from loopscape.landscape.linalg import lanczos, slq_density

VOCAB, N_CTX = 16, 12


class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block, causal attention through scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, n, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Next-token logits at the last position (no positional encoding, as the looped GPTs of Appendix E.2)."""

    def __init__(self, d: int, layers: int = 1, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, x):
        return self.head(self.ln(self.blocks(self.embed(x))))[:, -1]


def trained_model(d: int, layers: int, batch: int, seed: int = 0):
    """A GPT block model moved off its initialisation (100 Adam steps on sum-modulo-vocab), in eval mode."""
    torch.manual_seed(seed)
    model = TinyGPT(d, layers).eval()
    x = torch.randint(0, VOCAB, (batch, N_CTX))
    y = x.sum(1) % VOCAB
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


class Reference:
    """Textbook double backward on a float64 copy, math attention: the trusted Hessian-vector product."""

    def __init__(self, model: nn.Module, x, y):
        self.model = copy.deepcopy(model).double()
        self.params = list(self.model.parameters())
        self.x, self.y = x, y
        with sdpa_kernel(SDPBackend.MATH):
            loss = F.cross_entropy(self.model(x), y)
            self.g = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, self.params, create_graph=True)])
        self.P = self.g.numel()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.autograd.grad(self.g, self.params, v.double(), retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    def finite_difference_error(self, v: torch.Tensor, eps: float = 1e-5) -> float:
        """Relative gap between the product and ``(g(theta + eps v) - g(theta - eps v)) / 2 eps``."""
        theta = torch.cat([p.detach().reshape(-1) for p in self.params])

        def grad_at(t):
            m = copy.deepcopy(self.model)
            torch.nn.utils.vector_to_parameters(t, m.parameters())
            with sdpa_kernel(SDPBackend.MATH):
                loss = F.cross_entropy(m(self.x), self.y)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])

        fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
        return rel(self.matvec(v), fd)

    def top(self, k: int = 5) -> np.ndarray:
        lin = LinearOperator(
            (self.P, self.P), matvec=lambda v: self.matvec(torch.from_numpy(v.ravel()).to(self.g.device)).cpu().numpy()
        )
        return np.sort(eigsh(lin, k=k, which="LA", tol=1e-10, return_eigenvectors=False))[::-1]

    def dense(self) -> torch.Tensor:
        """Column by column, one product each (no batching: nothing between us and autograd)."""
        eye = torch.eye(self.P, dtype=torch.float64, device=self.g.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.P)], dim=1)


def on(device: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Trained on the CPU (the same model everywhere), then moved."""
    return model.to(device), x.to(device), y.to(device)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        synchronize()
        t0 = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), result


# -- each library, called as its documentation shows ---------------------------------------------------


def ours_operator(model, x, y):
    return HessianOperator(model, [(x, y)], cache_graph=True)


def curvlinops_operator(model, x, y):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)])


def eigenthings_operator(model, x, y):
    import hessian_eigenthings as he

    return he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))


def pyhessian_object(model, x, y, zero_grad: bool = True):
    """PyHessian builds its gradient graph by ``loss.backward(create_graph=True)``, which adds to
    ``.grad``: each construction starts from cleared gradients, or a second one measures 2H."""
    from pyhessian import hessian

    if zero_grad:
        model.zero_grad(set_to_none=True)
    return hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)


def product_of(name: str, model, x, y, v: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
    """One Hessian-vector product through each library's own path."""
    if name == "ours":
        return ours_operator(model, x, y).matvec(v)
    if name == "curvlinops":
        return curvlinops_operator(model, x, y) @ v.float()
    if name == "hessian-eigenthings":
        return eigenthings_operator(model, x, y).matvec(v.float())
    from pyhessian.utils import hessian_vector_product

    ph = pyhessian_object(model, x, y, zero_grad)
    parts = list(v.float().split([p.numel() for p in ph.params]))
    hv = hessian_vector_product(ph.gradsH, ph.params, [t.view_as(p) for t, p in zip(parts, ph.params)])
    return torch.cat([h.reshape(-1) for h in hv])


def top5_runs(model, x, y, repeat: int, pyhessian_tols) -> dict[str, list[dict]]:
    """Each method's top-5 eigenvalues along its own accuracy knob: (setting, seconds, eigenvalues, products)."""
    runs: dict[str, list[dict]] = {"ours": [], "curvlinops": [], "hessian-eigenthings": [], "pyhessian": []}
    for block, tol in itertools.product(OUR_BLOCKS, (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-6)):

        def ours(tol=tol, block=block):
            return lanczos(ours_operator(model, x, y), k=5, which="LA", tol=tol, block=block)

        s, res = best_of(ours, repeat)
        runs["ours"].append(
            {"tol": tol, "block": block, "s": s, "eig": res.eigenvalues.numpy(), "products": res.iterations}
        )
    with sdpa_kernel(SDPBackend.MATH):  # what every baseline needs for double backward through attention
        for tol in (1e-1, 1e-2, 1e-3, 1e-4, 0.0):

            def cl(tol=tol):
                H = curvlinops_operator(model, x, y).to_scipy()
                return np.sort(eigsh(H, k=5, which="LA", tol=tol, return_eigenvectors=False))[::-1]

            s, eig = best_of(cl, repeat)
            runs["curvlinops"].append({"tol": tol, "s": s, "eig": eig})
        import hessian_eigenthings as he

        for steps in (10, 15, 20, 30, 40, 60):

            def het(steps=steps):
                return he.lanczos(eigenthings_operator(model, x, y), k=5, max_iter=steps, which="LA", seed=0)

            s, res = best_of(het, repeat)
            eig = np.sort(res.eigenvalues.double().cpu().numpy())[::-1]
            runs["hessian-eigenthings"].append({"max_iter": steps, "s": s, "eig": eig, "products": steps})
        for tol in pyhessian_tols:

            def ph(tol=tol):
                return pyhessian_object(model, x, y).eigenvalues(top_n=5, maxIter=1000, tol=tol)[0]

            s, eig = best_of(ph, 1 if tol < 1e-3 else repeat)
            runs["pyhessian"].append({"tol": tol, "s": s, "eig": np.sort(np.asarray(eig))[::-1]})
    return runs


OUR_BLOCKS = (1, 4, 8)  # single-vector and block Lanczos (one batched product of `block` columns per step)
SETTINGS = ((4, 16), (4, 32), (8, 32), (8, 64), (16, 64))  # SLQ probes x Lanczos steps, every method
DEFLATE = 20  # our deflated runs: the 20 largest eigenvalues taken exactly


def density_runs(model, x, y, settings, seeds, exact=None) -> dict[str, list[dict]]:
    """Each method at each (probes, steps), once per seed: mean seconds and, given the exact
    spectrum, mean Wasserstein-1 distance to it (else the measures, for comparing methods)."""
    runs: dict[str, list[dict]] = {"ours": [], "curvlinops": [], "hessian-eigenthings": [], "pyhessian": []}
    for probes, steps in settings:
        for deflate in (0, DEFLATE):
            for name, fn in density_methods(model, x, y, probes, steps, deflate).items():
                row = {"probes": probes, "steps": steps, **({"deflate": deflate} if name == "ours" else {})}
                times, w1, measures = [], [], []
                try:
                    for seed in seeds if name != "pyhessian" else seeds[:1]:
                        torch.manual_seed(seed)  # the baselines draw their probes from the global generator
                        synchronize()
                        t0 = time.perf_counter()
                        with sdpa_kernel(SDPBackend.MATH):  # the baselines need it; ours chooses it itself
                            pts, ws = fn(seed)
                        times.append(time.perf_counter() - t0)
                        measures.append((pts, np.clip(ws, 0, None)))
                        if exact is not None:
                            w1.append(float(wasserstein_distance(pts, exact, u_weights=measures[-1][1])))
                    row["s"] = round(float(np.mean(times)), 3)
                    row.update({"w1_to_exact": float(np.mean(w1))} if w1 else {"measures": measures})
                except Exception as err:  # say what fails on this torch, compare what runs
                    row["error"] = first_line(err)
                runs[name].append(row)
    return runs


def density_methods(model, x, y, probes: int, steps: int, deflate: int) -> dict:
    """Each library's density as ``seed -> (points, masses)``: SLQ nodes and weights where it gives
    them (pooled over probes), curvlinops' smoothed density on its grid."""
    import hessian_eigenthings as he
    from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

    def ours(seed):
        sd = slq_density(ours_operator(model, x, y), n_probes=probes, n_steps=steps, seed=seed, deflate=deflate)
        return sd.measure()

    def eigenthings(seed):
        r = he.spectral_density(eigenthings_operator(model, x, y), num_runs=probes, lanczos_steps=steps, seed=seed)
        pts, ws = (t.double().reshape(-1).cpu().numpy() for t in (r.raw_eigenvalues, r.raw_weights))
        return pts, ws / probes

    def curvlinops(seed):
        grid, dens = lanczos_approximate_spectrum(curvlinops_operator(model, x, y), steps, num_repeats=probes)
        grid, dens = (t.double().cpu().numpy() for t in (grid, dens))
        mass = dens * float(grid[1] - grid[0])
        return grid, mass / mass.sum()

    def pyhessian(seed):
        pts, ws = pyhessian_object(model, x, y).density(iter=steps, n_v=probes)
        return np.asarray(pts).ravel(), np.asarray(ws).ravel() / probes

    if deflate:
        return {"ours": ours}
    return {"ours": ours, "curvlinops": curvlinops, "hessian-eigenthings": eigenthings, "pyhessian": pyhessian}


def first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def speedups(runs: dict[str, list[dict]], key: str) -> list[dict]:
    """At each baseline run's accuracy (``key``, lower is better): the fastest baseline run at least
    that accurate, our fastest run at least that accurate, and the ratio of their times."""
    levels = sorted({r[key] for n, rs in runs.items() if n != "ours" for r in rs if key in r})
    table = []
    for level in levels:
        best = {
            n: min((r for r in rs if r.get(key, np.inf) <= level), key=lambda r: r["s"], default=None)
            for n, rs in runs.items()
        }
        baseline = min((n for n in best if n != "ours" and best[n]), key=lambda n: best[n]["s"])
        row = {"level": level, "fastest_baseline": baseline, "baseline_s": best[baseline]["s"]}
        if best["ours"]:
            row.update(ours_s=best["ours"]["s"], speedup=round(best[baseline]["s"] / best["ours"]["s"], 2))
            row["ours_run"] = {k: v for k, v in best["ours"].items() if k not in ("s", key)}
        table.append(row)
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--density-d", type=int, default=24, help="block width of the density comparison (exact spectrum)")
    ap.add_argument("--seeds", type=int, default=3, help="SLQ runs per setting and method (W1 and time averaged)")
    ap.add_argument("--skip-density", action="store_true")
    ap.add_argument("--device", default="cpu", help="where models, data and every method's products live")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(args.device)

    # -- top-5 ----------------------------------------------------------------------------------
    model, x, y = on(args.device, *trained_model(args.d, args.layers, args.batch))
    ref = Reference(model, x, y)
    v = torch.randn(ref.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(args.device)
    v /= v.norm()
    t0 = time.perf_counter()
    top = ref.top()
    out["top5"] = {
        "d": args.d,
        "layers": args.layers,
        "params": ref.P,
        "batch": args.batch,
        "reference_top5": top.tolist(),
        "reference_s": round(time.perf_counter() - t0, 1),
        "reference_vs_finite_differences": ref.finite_difference_error(v),
    }
    hv = ref.matvec(v)
    products = {}
    for name in ("ours", "curvlinops", "hessian-eigenthings", "pyhessian"):
        row = {}
        try:  # as a user calls it: the default attention kernel
            row["as_called"] = rel(product_of(name, model, x, y, v), hv)
        except Exception as err:
            row["as_called"] = first_line(err)
        with sdpa_kernel(SDPBackend.MATH):
            row["math_kernel"] = rel(product_of(name, model, x, y, v), hv)
        products[name] = row
    with sdpa_kernel(SDPBackend.MATH):  # PyHessian once more without clearing .grad, as a notebook would
        products["pyhessian"]["math_kernel_second_call"] = rel(product_of("pyhessian", model, x, y, v, False), hv)
    out["top5"]["product_vs_reference"] = products

    pyhessian_tols = (1e-2, 1e-3) if ref.P > 300_000 else (1e-2, 1e-3, 1e-4)
    runs = top5_runs(model, x, y, args.repeat, pyhessian_tols)
    for rs in runs.values():
        for r in rs:
            r["max_rel_err"] = float(np.max(np.abs(r.pop("eig") - top) / np.abs(top)))
            r["s"] = round(r["s"], 3)
    out["top5"]["runs"] = runs
    out["top5"]["speedup_at_equal_accuracy"] = speedups(runs, "max_rel_err")

    # -- density: W1 against the exact spectrum of a smaller block ----------------------------------------
    if not args.skip_density:
        small, xs, ys = on(args.device, *trained_model(args.density_d, args.layers, args.batch))
        sref = Reference(small, xs, ys)
        t0 = time.perf_counter()
        H = sref.dense()
        exact = torch.linalg.eigvalsh((H + H.T) / 2).cpu().numpy()
        del H
        dens = {"d": args.density_d, "params": sref.P, "exact_s": round(time.perf_counter() - t0, 1)}
        dens["exact_range"] = [float(exact.min()), float(exact.max())]
        dens["runs"] = density_runs(small, xs, ys, SETTINGS, list(range(args.seeds)), exact)
        dens["speedup_at_equal_w1"] = speedups(dens["runs"], "w1_to_exact")
        out["density_exact"] = dens

        # one setting at the top-5 width: time side by side, W1 between methods (no exact spectrum there)
        big = density_runs(model, x, y, ((8, 32),), [0])
        ours_pts, ours_ws = big["ours"][0]["measures"][0]
        for rs in big.values():
            for r in rs:
                if "measures" in r:
                    pts, ws = r.pop("measures")[0]
                    r["w1_to_ours_plain"] = float(wasserstein_distance(pts, ours_pts, ws, ours_ws))
        out["density_at_d"] = big
    print(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
