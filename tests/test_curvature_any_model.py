"""The Hessian of any model: HF dict batches with the model's own loss, (inputs, targets) from a
DataLoader, parameter selection, the one-call API and scipy interop, against independent references."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from loopscape.landscape import hessian_operator, hessian_trace, spectral_density, top_eigenvalues
from loopscape.landscape.hessian import COLUMN_COPIES, HessianOperator, weighted_batches
from loopscape.landscape.linalg import dense_matrix
from loopscape.models.linear_attn import looped_attn

transformers = pytest.importorskip("transformers")
V = 12


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_batches():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, V, (2, 6), generator=g)
    b = torch.randint(0, V, (3, 4), generator=g)
    labels_a = a.clone()
    labels_a[0, 4:] = -100  # padding: not scored
    mask_a = (labels_a != -100).long()
    return [
        {"input_ids": a, "attention_mask": mask_a, "labels": labels_a},
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()},
    ]


def test_dict_batches_give_the_hessian_of_the_models_own_loss():
    """Reference: torch.autograd.functional.hessian of HF's own `.loss` (a mean per batch), combined
    over batches by their scored tokens, as a function of one LayerNorm's parameters."""
    model, batches = tiny_gpt2(), hf_batches()
    name = "transformer.h.1.ln_1.*"
    H = dense_matrix(hessian_operator(model, batches, params=name, dtype=torch.float64))
    names = ["transformer.h.1.ln_1.weight", "transformer.h.1.ln_1.bias"]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().double().reshape(-1) for n in names])
    scored = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    model64 = model.double()

    def loss(th):
        w, b = th.split(8)
        out = 0
        for batch, n in zip(batches, scored):
            res = torch.func.functional_call(model64, {names[0]: w, names[1]: b}, (), {**batch, "use_cache": False})
            out = out + res.loss * n
        return out / sum(scored)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference = torch.autograd.functional.hessian(loss, theta)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-12)


def test_pairs_from_a_dataloader_equal_weighted_triples_and_params_select_the_same_block():
    torch.manual_seed(0)
    model = looped_attn(n_loops=3, max_len=3)
    x, y = torch.randint(0, 3, (30, 3)), torch.randint(0, 3, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    H_pairs = dense_matrix(HessianOperator(model, loader, dtype=torch.float64))
    H_triples = dense_matrix(HessianOperator(model, weighted_batches(x, y, batch_size=11), dtype=torch.float64))
    torch.testing.assert_close(H_pairs, H_triples, rtol=1e-10, atol=1e-12)
    by_name = dense_matrix(hessian_operator(model, loader, params="W_K", dtype=torch.float64))
    by_list = dense_matrix(hessian_operator(model, loader, params=[model.W_K], dtype=torch.float64))
    d = model.W_K.numel()
    offset = sum(p.numel() for n, p in model.named_parameters() if n in ("W_V",))  # W_V comes first
    torch.testing.assert_close(by_name, by_list)
    torch.testing.assert_close(by_name, H_pairs[offset : offset + d, offset : offset + d], rtol=1e-10, atol=1e-12)


def test_one_call_answers_agree_with_the_exact_spectrum_and_scipy():
    from scipy.sparse.linalg import eigsh

    model, batches = tiny_gpt2(), hf_batches()
    params = "transformer.h.0.attn.c_proj.*"
    exact = torch.linalg.eigvalsh(dense_matrix(hessian_operator(model, batches, params=params, dtype=torch.float64)))
    top = top_eigenvalues(model, batches, k=3, params=params, dtype=torch.float64, tol=1e-10)
    torch.testing.assert_close(top, exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    by_block = top_eigenvalues(
        model, batches, k=3, params=params, dtype=torch.float64, tol=1e-10, block=3
    )  # batched products, same answer
    torch.testing.assert_close(by_block, exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    with_vectors = top_eigenvalues(
        model, batches, k=2, params=params, dtype=torch.float64, tol=1e-10, eigenvectors=True
    )
    assert with_vectors.eigenvectors.shape == (exact.numel(), 2)
    trace = hessian_trace(model, batches, params=params, dtype=torch.float64, n_matvecs=exact.numel() * 3)
    assert abs(trace.trace - exact.sum().item()) < 1e-6 * max(1.0, abs(exact.sum().item()))  # Hutch++ at >= P
    nodes, weights = spectral_density(model, batches, params=params, dtype=torch.float64, n_probes=4).measure()
    assert abs(weights.sum() - 1) < 1e-9 and nodes.min() >= exact.min() - 1e-6 and nodes.max() <= exact.max() + 1e-6
    largest = eigsh(
        hessian_operator(model, batches, params=params, dtype=torch.float64).to_scipy(),
        k=3,
        which="LA",
        return_eigenvectors=False,
    )
    torch.testing.assert_close(torch.tensor(sorted(largest, reverse=True)), exact.flip(0)[:3], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, b: hessian_operator(m, b, params="nothing.*"),
            r"params must select at least one trainable parameter",
        ),
        (lambda m, b: hessian_operator(m, [torch.zeros(2)]), r"batches must be \(inputs, targets\)"),
        (lambda m, b: hessian_operator(m, [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}]), r"must hold labels"),
        (lambda m, b: top_eigenvalues(m, b, k=10**6, params="transformer.h.0.ln_1.*"), r"k must be between 1 and"),
        (
            lambda m, b: top_eigenvalues(m, b, k=2, params="transformer.h.0.ln_1.*", block=0),
            r"^block must be between 1",
        ),
    ],
)
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_gpt2(), hf_batches())


def _shard_hessians(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    toy, x, y = _toy_data()
    pairs = [(x[rank::2], y[rank::2])]  # each rank holds half of the samples
    H_toy = dense_matrix(HessianOperator(toy, pairs, dtype=torch.float64, distributed=True))
    mine = hf_batches()[rank : rank + 1]  # each rank one of the two (unequal) HF batches
    H_hf = dense_matrix(
        hessian_operator(tiny_gpt2(), mine, params="transformer.h.1.ln_1.*", distributed=True, dtype=torch.float64)
    )
    torch.save({"toy": H_toy, "hf": H_hf}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _toy_data():
    torch.manual_seed(0)
    model = looped_attn(n_loops=3, max_len=3)
    g = torch.Generator().manual_seed(5)
    return model, torch.randint(0, 3, (40, 3), generator=g), torch.randint(0, 3, (40,), generator=g)


def test_products_over_data_sharded_across_two_processes_equal_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_shard_hessians, args=(port, str(tmp_path)), nprocs=2)
    toy, x, y = _toy_data()
    one_toy = dense_matrix(HessianOperator(toy, [(x, y)], dtype=torch.float64))
    one_hf = dense_matrix(
        hessian_operator(tiny_gpt2(), hf_batches(), params="transformer.h.1.ln_1.*", dtype=torch.float64)
    )
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, one in (("toy", one_toy), ("hf", one_hf)):
            assert (got[key] - one).norm() <= 1e-10 * one.norm(), (rank, key)


def test_a_dense_hessian_or_a_lanczos_basis_that_would_not_fit_is_refused_in_one_line(monkeypatch):
    from loopscape.config import ConfigError
    from loopscape.landscape.linalg import DenseOperator, lanczos

    monkeypatch.setattr("loopscape.config.machine_memory", lambda: 1_000_000)
    op = DenseOperator(torch.eye(400, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"^params must be small enough to fit in memory \(a dense Hessian"):
        dense_matrix(op)
    with pytest.raises(ConfigError, match=r"^max_iter must be small enough to fit in memory \(a Lanczos basis"):
        lanczos(DenseOperator(torch.diag(torch.arange(1.0, 401.0, dtype=torch.float64))), k=300)
    with pytest.raises(ConfigError, match=r"^max_iter must be small enough to fit in memory \(a block Lanczos basis"):
        lanczos(DenseOperator(torch.diag(torch.arange(1.0, 401.0, dtype=torch.float64))), k=300, block=50)
    monkeypatch.setattr("loopscape.config.machine_memory", lambda: 100_000)  # not even the first 33 vectors
    with pytest.raises(ConfigError, match=r"^max_iter must be .* \(a Lanczos basis of 1 x 400 x 33, float64: about"):
        lanczos(op, k=2)


def test_on_a_gpu_the_size_check_counts_the_gpus_memory(monkeypatch):
    # a basis or dense Hessian that lives on a CUDA device must fit there, not in the host's memory
    from types import SimpleNamespace

    from loopscape.config import ConfigError, require_fits

    monkeypatch.setattr("loopscape.config.machine_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**30))
    require_fits(2 * 2**30, "max_iter", 64, "a Lanczos basis")  # the host holds it
    with pytest.raises(ConfigError, match=r"\(a Lanczos basis: about 2.0 GiB, cuda:0 has 1.0 GiB\) \(got 64\)$"):
        require_fits(2 * 2**30, "max_iter", 64, "a Lanczos basis", torch.device("cuda:0"))


def test_the_paper_metrics_from_a_density_approach_the_exact_ones():
    """A spectrum with a valley of 150 small eigenvalues and a river of 50 larger ones: the SLQ
    pseudo-spectrum gives the same valley dimension and U/V shape, and a Matrix Entropy within 0.1 nat."""
    from loopscape.landscape.linalg import DenseOperator, slq_density
    from loopscape.landscape.river_valley import valley_diagnostics
    from loopscape.landscape.spectrum import matrix_entropy

    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.linspace(1e-4, 5e-3, 150), torch.linspace(1.0, 3.0, 50)]).double()
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    op = DenseOperator(Q @ torch.diag(eigs) @ Q.T)
    pseudo = slq_density(op, n_probes=40, n_steps=80).pseudo_spectrum(200)
    exact_v, approx_v = valley_diagnostics(eigs.numpy(), eps=0.5), valley_diagnostics(pseudo, eps=0.5)
    assert abs(approx_v.d_valley - exact_v.d_valley) <= 10 and approx_v.shape == exact_v.shape == "V"
    assert abs(matrix_entropy(pseudo) - matrix_entropy(eigs)) < 0.1
    assert list(pseudo) == sorted(pseudo) and len(pseudo) == 200


def test_one_krylov_run_gives_the_density_the_top_eigenvalues_and_the_trace():
    """SLQ's probes in lockstep give what they give one at a time; their largest Ritz values are lower
    bounds on the top eigenvalues and, separated as these are, equal to them; v^T H v = P alpha_1 gives
    the trace within 3 standard errors (fixed seed)."""
    from loopscape.landscape.linalg import DenseOperator, slq_density

    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.linspace(0.0, 0.1, 190), torch.tensor([1.0, 2, 3, 5, 8, 13, 21, 34, 55, 89])]).double()
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    op = DenseOperator(Q @ torch.diag(eigs) @ Q.T)
    together, apart = slq_density(op, 6, 30, seed=3), slq_density(op, 6, 30, seed=3, block=1)
    torch.testing.assert_close(together.nodes, apart.nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(together.weights, apart.weights, rtol=0, atol=1e-10)
    top, residuals = together.top(5)
    exact = eigs.sort(descending=True).values[:5]
    assert (top <= exact + 1e-9).all() and (residuals < 1e-6).all()
    torch.testing.assert_close(top, exact, rtol=1e-9, atol=0)
    trace = together.trace()
    assert trace.stderr > 0 and abs(trace.trace - eigs.sum().item()) < 3 * trace.stderr


def test_deflated_slq_takes_the_outliers_exactly_and_is_closer_to_the_spectrum():
    """deflate=10: the 10 largest eigenvalues as nodes of mass 1/P in every probe's measure, the rest
    at mass (P-10)/P; over 5 seeds its Wasserstein-1 distance to the exact spectrum is below plain
    SLQ's at the same probes and steps (the outliers carry plain SLQ's error)."""
    from scipy.stats import wasserstein_distance

    from loopscape.landscape.linalg import DenseOperator, slq_density

    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.linspace(0.0, 0.1, 190), torch.tensor([1.0, 2, 3, 5, 8, 13, 21, 34, 55, 89])]).double()
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    op = DenseOperator(Q @ torch.diag(eigs) @ Q.T)
    deflated = slq_density(op, 4, 12, seed=0, deflate=10)
    torch.testing.assert_close(deflated.nodes[:, :10], eigs.flip(0)[:10].expand(4, -1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(deflated.weights[:, :10], torch.full((4, 10), 1 / 200, dtype=torch.float64))
    torch.testing.assert_close(deflated.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(deflated.top(3)[0], eigs.flip(0)[:3], rtol=1e-9, atol=0)

    def w1(sd):
        points, masses = sd.measure()
        return wasserstein_distance(points, eigs.numpy(), u_weights=masses)

    plain = [w1(slq_density(op, 4, 12, seed=s)) for s in range(5)]
    better = [w1(slq_density(op, 4, 12, seed=s, deflate=10)) for s in range(5)]
    assert np.mean(better) < 0.5 * np.mean(plain)


def test_curvlinops_and_scipy_operators_run_in_our_algorithms():
    """curvlinops 3's HessianLinearOperator of the same model and data gives our Lanczos the
    eigenvalues our own operator gives; so does scipy's view of ours."""
    curvlinops = pytest.importorskip("curvlinops")
    from loopscape.landscape.linalg import ForeignOperator, lanczos

    toy, x, y = _toy_data()
    toy = toy.double()
    ours = HessianOperator(toy, [(x, y)], dtype=torch.float64)
    theirs = curvlinops.HessianLinearOperator(toy, torch.nn.CrossEntropyLoss(), [p for p in toy.parameters()], [(x, y)])
    expected = lanczos(ours, k=4).eigenvalues
    torch.testing.assert_close(lanczos(ForeignOperator(theirs), k=4).eigenvalues, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lanczos(ForeignOperator(ours.to_scipy()), k=4).eigenvalues, expected)
    with pytest.raises(ValueError, match="op must be a scipy LinearOperator or have shape and @"):
        ForeignOperator(object())


def test_batched_products_are_chunked_to_the_memory_budget():
    """A budget below two columns' estimated memory gives one column per product, the same numbers
    as all columns at once; the default budget on this tiny model takes them all at once."""
    model, batches = tiny_gpt2(), hf_batches()
    whole = hessian_operator(model, batches, params="transformer.h.0.*", cache_graph=True, dtype=torch.float64)
    columns = torch.randn(whole.shape[0], 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert whole.columns_per_product() >= 6
    one_per = whole._saved_bytes() * COLUMN_COPIES * 1.5  # room for one column, not two
    tight = hessian_operator(
        model, batches, params="transformer.h.0.*", cache_graph=True, memory_budget=one_per, dtype=torch.float64
    )
    assert tight.columns_per_product() == 1
    torch.testing.assert_close(tight.matmat(columns), whole.matmat(columns), rtol=1e-10, atol=1e-12)
    fixed = hessian_operator(model, batches, params="transformer.h.0.*", chunk_size=4, dtype=torch.float64)
    assert fixed.columns_per_product() == 4
    torch.testing.assert_close(fixed.matmat(columns), whole.matmat(columns), rtol=1e-8, atol=1e-10)


def test_dict_batches_that_score_no_token_are_one_line():
    ids = torch.randint(0, V, (2, 5))
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first position is never a next-token target
    with pytest.raises(ValueError, match="labels must score at least one token"):
        HessianOperator(tiny_gpt2(), [{"input_ids": ids, "labels": labels}])


def test_new_user_inputs_get_an_answer_or_one_line():
    import importlib

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    # one batch passed bare is one batch, as a tuple and as a dict
    assert torch.equal(dense_matrix(hessian_operator(model, (x, y))), dense_matrix(hessian_operator(model, [(x, y)])))
    # n_probes=0 is refused before the operator's forward passes
    import loopscape.landscape.api as api

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "HessianOperator", None)  # building one would raise a TypeError
        with pytest.raises(ValueError, match=r"^n_probes must be an integer >= 1 \(got 0\)$"):
            spectral_density(model, [(x, y)], n_probes=0)
    # frozen weights are named as frozen, not as a pattern that matches nothing
    model[0].requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"^params selects only frozen parameters \(requires_grad=False\), e\.g\. '0\.weight'"
    ):
        hessian_operator(model, [(x, y)], params="0.*")
    model[2].bias.requires_grad_(False)  # frozen inside a pattern (with layer 0): measured without, and said so
    assert hessian_operator(model, [(x, y)], params="*").path.endswith("; 18 frozen weights it matched left out")
    assert hessian_operator(model, [(x, y)]).path.endswith(" products")  # the default: every trainable weight
    model[2].bias.requires_grad_(True)
    model[0].requires_grad_(True)
    # too few products for Hutch++'s thirds, an integer dtype and a bare tensor as a batch: one line each
    with pytest.raises(
        ValueError, match=r"^n_matvecs must be an integer >= 9: three thirds of at least 3 products \(got 2\)$"
    ):
        hessian_trace(model, [(x, y)], n_matvecs=2)
    with pytest.raises(
        ValueError, match=r"^dtype must be a floating torch dtype or None \(the model's\) \(got torch\.int64\)$"
    ):
        top_eigenvalues(model, [(x, y)], k=1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(got a tuple of 1 Tensor\)$"):
        top_eigenvalues(model, [x], k=1)
    # the module is the module
    assert inspect.ismodule(importlib.import_module("loopscape.landscape.hessian"))
    import loopscape.landscape.hessian as module

    assert inspect.ismodule(module) and hasattr(module, "HessianOperator")
    density = spectral_density(model, [(x, y)], n_probes=3, deflate=0)
    assert len(repr(density)) < 200 and repr(density).startswith("SpectralDensity(probes=3")


def test_the_defaults_take_the_fast_path_say_which_and_agree_with_the_exact_answer(capsys, caplog):
    """Defaults: products in the model's precision through the kept graph (it fits), float64 Lanczos;
    the path is logged and, with verbose, printed beside the products done; a budget the graph does
    not fit gives forward-over-reverse products, the same numbers."""
    import logging

    model, batches = tiny_gpt2(), hf_batches()
    params = "transformer.h.0.attn.c_proj.*"
    exact = torch.linalg.eigvalsh(dense_matrix(hessian_operator(model, batches, params=params, dtype=torch.float64)))
    fast = hessian_operator(model, batches, params=params)
    assert fast.dtype == torch.float32 and fast._graph is not None
    assert fast.path.startswith("one backward per product through the kept gradient graph (graph and a product: about ")
    assert fast.path.endswith(" MiB), float32 products")
    with caplog.at_level(logging.INFO, logger="loopscape.landscape"):
        result = top_eigenvalues(model, batches, k=3, params=params, eigenvectors=True, verbose=True)
    scale = exact.abs().max()
    assert ((result.eigenvalues - exact.flip(0)[:3]).abs() <= 1e-4 * scale).all()  # float32 products
    assert (result.residuals <= 1e-5 * result.eigenvalues.abs().max()).all()
    line = f"top_eigenvalues: {exact.numel()} parameters, {fast.path}"
    assert [r.getMessage() for r in caplog.records if r.name == "loopscape.landscape"] == [line]
    err = capsys.readouterr().err
    assert line in err and f"top_eigenvalues: {result.iterations} products" in err
    # the same call, not verbose, prints nothing
    top_eigenvalues(model, batches, k=3, params=params, verbose=False)
    assert capsys.readouterr().err == ""
    # a budget the kept graph does not fit: a fresh pass per product, the same products
    slow = hessian_operator(model, batches, params=params, memory_budget=1)
    assert slow._graph is None and slow.path.startswith("a forward-over-reverse pass per product (graph and a product")
    v = torch.randn(exact.numel(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(slow.matvec(v), fast.matvec(v), rtol=1e-4, atol=1e-6)
    assert (slow.products, fast.products) == (1, 1)
    fast.matmat(torch.randn(exact.numel(), 4))
    assert fast.products == 5


def test_a_warm_started_probe_takes_its_top_from_the_last_ritz_vectors():
    """At unchanged weights the second measurement starts from the first's Ritz vectors, which span the
    top eigenvectors: it converges in the first blocks, to the same values; the default probe does not."""
    from loopscape.landscape.probe import WARM_TOL, CurvatureProbe

    model, batches = tiny_gpt2(), hf_batches()
    params = "transformer.h.0.attn.c_proj.*"
    exact = torch.linalg.eigvalsh(dense_matrix(hessian_operator(model, batches, params=params, dtype=torch.float64)))
    probe = CurvatureProbe(batches, every=1, k=3, params=params, warm_start=True, dtype=torch.float64)
    cold, warm = probe.measure(model, 1), probe.measure(model, 2)
    for row in (cold, warm):
        top = torch.tensor(row["top_eigenvalues"], dtype=torch.float64)
        assert ((top - exact.flip(0)[:3]).abs() <= WARM_TOL * exact.abs().max()).all()
    assert warm["top_products"] <= 2 * 3 < cold["top_products"], (cold["top_products"], warm["top_products"])
    plain = CurvatureProbe(batches, every=1, k=3, params=params).measure(model, 1)
    assert "top_products" not in plain


def test_a_half_precision_model_gets_float32_products_and_a_small_warm_probe_starts_cold():
    model, batches = tiny_gpt2(), hf_batches()
    assert hessian_operator(model.to(torch.bfloat16), batches, params="transformer.h.0.ln_1.*").dtype == torch.float32
    from loopscape.landscape.probe import CurvatureProbe

    # 16 weights, k = 10: the last 10 Ritz vectors leave no room for a block start (16 < 10 + 10), so each
    # measurement starts cold instead of failing in the middle of training; a resumed probe forgets its vectors
    probe = CurvatureProbe(batches, every=1, k=10, n_steps=12, params="transformer.h.0.ln_1.*", warm_start=True)
    model = tiny_gpt2()
    first, second = probe.measure(model, 1), probe.measure(model, 2)
    largest = max(first["top_eigenvalues"])
    assert first["top_eigenvalues"] == pytest.approx(second["top_eigenvalues"], abs=1e-4 * largest)  # float32
    assert first["top_products"] <= 16 and second["top_products"] <= 16  # cold: from one vector, within P
    probe.load_state_dict(probe.state_dict())
    assert probe._ritz is None


def test_a_probe_bins_by_its_n_bins_and_its_rows_say_so(tmp_path):
    """The report's threshold reads n_bins from the rows (reporting.curvature): each row records the probe's, and its
    entropies are binned by it (at one step both probes draw the same density: only the binning differs)."""
    import json
    import math

    from loopscape.landscape.probe import CurvatureProbe

    model = looped_attn(n_loops=2, vocab_size=3, max_len=4).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 3, (8, 4), generator=g), torch.randint(0, 3, (8,), generator=g))]
    rows = {}
    for n_bins in (4, 50):
        probe = CurvatureProbe(batches, every=1, k=2, n_bins=n_bins, folder=tmp_path / str(n_bins))
        rows[n_bins] = [probe.measure(model, 1), probe.measure(model, 2)]
        written = [json.loads(line) for line in (tmp_path / str(n_bins) / "curvature.jsonl").read_text().splitlines()]
        assert [r["n_bins"] for r in written] == [n_bins, n_bins]
    assert all(r["matrix_entropy"] <= math.log(4) + 1e-12 for r in rows[4])
    assert rows[4][0]["matrix_entropy"] != rows[50][0]["matrix_entropy"]
    assert rows[4][1]["mutual_information"] != rows[50][1]["mutual_information"]


def test_two_lightning_curvature_callbacks_keep_their_own_state_through_a_checkpoint(tmp_path):
    """Each CurvatureCallback's state_key names its settings (Lightning's advice for stateful callbacks): two of
    them in one trainer are allowed, saved apart and resumed apart; a checkpoint from before keeps the one
    callback's state under the class name, and the one callback of the resumed trainer takes it back."""
    L = pytest.importorskip("lightning")
    from loopscape.integrations.lightning import CurvatureCallback

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 3, (16, 4), generator=g), torch.randint(0, 3, (16,), generator=g)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = looped_attn(n_loops=2, vocab_size=3, max_len=4)

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def callbacks():
        every_two = CurvatureCallback([(x[:8], y[:8])], every=2, k=2, module="model", folder=tmp_path / "a")
        every_three = CurvatureCallback([(x[8:], y[8:])], every=3, k=2, module="model", folder=tmp_path / "b")
        return every_two, every_three

    def fit(steps, cbs, ckpt=None):
        trainer = L.Trainer(
            max_steps=steps,
            callbacks=list(cbs),
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        trainer.fit(Module(), loader, ckpt_path=ckpt)
        return trainer

    first = callbacks()
    assert first[0].state_key != first[1].state_key
    fit(4, first).save_checkpoint(tmp_path / "step4.ckpt")
    saved = torch.load(tmp_path / "step4.ckpt", weights_only=True)["callbacks"]
    assert [r["step"] for r in saved[first[0].state_key]["rows"]] == [2, 4]
    assert [r["step"] for r in saved[first[1].state_key]["rows"]] == [3]
    resumed = callbacks()
    fit(6, resumed, tmp_path / "step4.ckpt")
    assert [r["step"] for r in resumed[0].probe.rows] == [2, 4, 6]
    assert [r["step"] for r in resumed[1].probe.rows] == [3, 6]
    assert resumed[0].probe.rows[:2] == saved[first[0].state_key]["rows"]
    # a checkpoint written before state_key: one CurvatureCallback, its state under the class name
    ckpt = torch.load(tmp_path / "step4.ckpt", weights_only=True)
    ckpt["callbacks"] = {"CurvatureCallback": ckpt["callbacks"][first[1].state_key]}
    torch.save(ckpt, tmp_path / "old.ckpt")
    alone = callbacks()[1]
    fit(6, [alone], tmp_path / "old.ckpt")
    assert [r["step"] for r in alone.probe.rows] == [3, 6]
