"""Truncated backprop through loops (``backprop_loops=k``): the looped GPT and loopify, in float64, against
full backprop and against a hand-written loop that detaches the state at the same place."""

import pytest
import torch

from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig


def _gpt(k=None):
    torch.manual_seed(0)
    cfg = LoopedGPTConfig(vocab_size=7, d_model=16, n_heads=2, n_layers=1, backprop_loops=k)
    return LoopedGPT(cfg).double()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hand(model, x, n, k):
    """The loop written out: every loop builds a graph; the state entering loop n - k + 1 is detached."""
    e, h = model.embed(x), None
    for t in range(1, n + 1):
        if h is not None and t == n - k + 1:
            h = h.detach()
        h = model.step(h, e)
    return model.head(h)


X = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1))


def test_the_looped_gpt_truncates_at_the_same_place_as_a_hand_written_loop():
    full, k2 = _gpt(), _gpt(2)
    k2.load_state_dict(full.state_dict())
    assert torch.equal(full(X, 5), k2(X, 5))  # the forward is unchanged
    truncated = _grads(k2, k2(X, 5).square().sum())
    hand = _grads(full, _hand(full, X, 5, 2).square().sum())
    for name in hand:
        assert torch.allclose(truncated[name], hand[name], rtol=1e-12, atol=1e-14), name
    every = _grads(full, full(X, 5).square().sum())
    assert any(not torch.allclose(truncated[n], every[n]) for n in every)  # it does cut something
    assert truncated["read_in.weight"].abs().sum() > 0  # E(x) keeps its gradient in the last k loops
    # k = n_loops is full backprop exactly, and so is a depth at or below k
    k5 = _gpt(5)
    assert all(torch.equal(a, b) for a, b in zip(_grads(k5, k5(X, 5).square().sum()).values(), every.values()))
    k9 = _gpt(9)
    at_three = _grads(full, full(X, 3).square().sum())
    assert all(torch.equal(a, b) for a, b in zip(_grads(k9, k9(X, 3).square().sum()).values(), at_three.values()))


def test_per_sample_depths_truncate_each_sample_at_its_own_last_k_loops():
    model = _gpt(2)
    depths = torch.tensor([5, 1, 3, 2])
    out = model(X, depths)
    with torch.no_grad():
        assert torch.allclose(out, torch.cat([model(X[i : i + 1], int(d)) for i, d in enumerate(depths)]))
    truncated = _grads(model, out.square().sum())
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i, d in enumerate(depths.tolist()):
        for name, g in _grads(model, _hand(model, X[i : i + 1], d, min(2, d)).square().sum()).items():
            reference[name] += g
    for name in reference:
        assert torch.allclose(truncated[name], reference[name], rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_backprop_loops_is_one_line(k):
    with pytest.raises(ValueError, match=r"^backprop_loops must be an integer >= 1 or None for every loop"):
        LoopedGPTConfig(vocab_size=7, d_model=16, n_heads=2, backprop_loops=k)


transformers = pytest.importorskip("transformers")
from hf_families import V, build  # noqa: E402

from loopscape.looped.decoder import looped_layers, loopify  # noqa: E402

IDS = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(2))


def _loss(model):
    return model(input_ids=IDS, labels=IDS, use_cache=False).loss


def _detaching_reference(n, k):
    """A Llama looped by loopify with full backprop, and a hook of the user's own (registered before
    loopify, so it sees loop t as its t-th call) that detaches the range's output at loop n - k."""
    model = build("llama", dtype=torch.float64)
    calls = []

    def detach(module, args, output):
        calls.append(1)
        if len(calls) == n - k:
            return (output[0].detach(), *output[1:]) if isinstance(output, tuple) else output.detach()
        return None

    model.model.layers[2].register_forward_hook(detach)
    return loopify(model, layers=(1, 3), n_loops=n), calls


@pytest.mark.parametrize("n, k", [(4, 1), (4, 2), (3, 2)])
def test_loopify_truncates_at_the_same_place_as_a_detaching_hook(n, k):
    truncated = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=n, backprop_loops=k)
    reference, calls = _detaching_reference(n, k)
    full = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=n)
    with torch.no_grad():
        assert torch.equal(truncated(input_ids=IDS).logits, full(input_ids=IDS).logits)  # forward unchanged
    got, want, every = (
        _grads(truncated, _loss(truncated)),
        _grads(reference, _loss(reference)),
        _grads(full, _loss(full)),
    )
    assert len(calls) == n
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-14), name
    assert any(not torch.allclose(got[m], every[m]) for m in every)
    assert got["model.layers.0.mlp.down_proj.weight"].abs().sum() > 0  # the layers before the range still train
    assert torch.is_grad_enabled()


def test_loopify_k_at_or_above_the_depth_is_full_backprop():
    full = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3)
    every = _grads(full, _loss(full))
    same = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, backprop_loops=3)
    assert all(torch.equal(a, b) for a, b in zip(_grads(same, _loss(same)).values(), every.values()))
    deeper = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=5, backprop_loops=3)
    looped_layers(deeper).n_loops = 3  # a sampled depth below k: every loop
    assert all(torch.equal(a, b) for a, b in zip(_grads(deeper, _loss(deeper)).values(), every.values()))


def test_loopify_saves_backprop_loops_and_restores_grad_mode_after_a_failure(tmp_path):
    model = loopify(build("llama"), layers=(1, 3), n_loops=4, backprop_loops=1)
    model.save_pretrained(tmp_path)
    import loopscape

    again = loopscape.from_pretrained(tmp_path)
    assert looped_layers(again).settings()["backprop_loops"] == 1

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(fail)  # inside the range, during the no-graph loop
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=IDS)
    handle.remove()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("k", [0, 5, 1.0])
def test_loopify_bad_backprop_loops_is_one_line(k):
    with pytest.raises(ValueError) as error:
        loopify(build("llama"), layers=(1, 3), n_loops=4, backprop_loops=k)
    assert str(error.value) == f"backprop_loops must be an integer from 1 to n_loops (4) or None (got {k!r})"


def test_the_algorithmic_trainer_counts_backward_flops_of_the_last_k_loops_only():
    from dataclasses import replace

    from loopscape.data.algorithmic import AlgorithmicTask
    from loopscape.models.looped_gpt import flops_per_token_step
    from loopscape.training.algorithmic import step_flops

    task = AlgorithmicTask("parity")
    batch = task.batch(torch.tensor([3, 5]), torch.Generator().manual_seed(0))
    full = LoopedGPTConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2)
    loops = torch.tensor([3, 6])
    per_loop = flops_per_token_step(full, batch.inputs.shape[1]) * batch.inputs.shape[1]
    # k = 2: backward skips 1 + 4 loops of the 9, each 2 x a loop's forward
    assert step_flops(full, batch, loops) - step_flops(replace(full, backprop_loops=2), batch, loops) == pytest.approx(
        2 * per_loop * 5
    )
    assert step_flops(replace(full, backprop_loops=6), batch, loops) == step_flops(full, batch, loops)


def test_lora_under_truncation_warns_and_its_early_loops_really_stay_untrained():
    """The warning's claim, checked: after a backward, the LoRA of the loops before the last k has no
    gradient, that of the last k has one."""
    with pytest.warns(UserWarning, match=r"^loop_lora with backprop_loops=1 trains the LoRA of the last 1 of 3 loops"):
        model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, loop_lora=2, backprop_loops=1)
    with torch.no_grad():
        for p in looped_layers(model).lora_parameters():
            p.add_(0.01)  # B away from 0, so A gets a gradient too
    _loss(model).backward()
    for lora in looped_layers(model).lora.values():
        grad = lora.B.grad
        assert grad[:2].abs().max() == 0 and grad[2].abs().max() > 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loopify(build("llama"), layers=(1, 3), n_loops=3, loop_lora=2, backprop_loops=3)  # every loop: no warning


def test_curvature_of_a_truncated_model_warns_and_the_setter_turns_truncation_off(tmp_path):
    from loopscape.landscape.hessian import HessianOperator
    from loopscape.looped import from_pretrained, set_backprop_loops, truncation

    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, backprop_loops=1)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float64)
    assert truncation(loaded) == 1
    batch = [{"input_ids": IDS, "labels": IDS}]
    params = "model.layers.1.input_layernorm.weight"
    with pytest.warns(UserWarning, match=r"back-propagates through its last 1 of 3 loops only .*set_backprop_loops"):
        HessianOperator(loaded, batch, params=params)
    set_backprop_loops(loaded, None)
    assert truncation(loaded) is None and loaded.config.loopscape["backprop_loops"] is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(loaded, batch, params=params)
    with pytest.raises(ValueError, match=r"^backprop_loops must be an integer >= 1 \(got 0\)$"):
        set_backprop_loops(loaded, 0)
