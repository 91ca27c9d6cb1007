"""Learned injection (injection="concat") and per-loop LoRA (loop_lora=r): each starts as the model it
extends, is saved and loaded with it, and computes what its definition says (float64, tiny models)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, build  # noqa: E402

import loopscape  # noqa: E402
from loopscape.looped.decoder import looped_layers, loopify  # noqa: E402
from loopscape.looped.sweep import flops_per_token  # noqa: E402

IDS = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_concat_injection_starts_as_add_and_is_saved_with_the_model(family, tmp_path):
    add = loopify(build(family, dtype=torch.float64), layers=(1, 3), n_loops=3)
    concat = loopify(build(family, dtype=torch.float64), layers=(1, 3), n_loops=3, injection="concat")
    assert torch.equal(_logits(concat), _logits(add))  # W = [I I], c = 0 is h + e exactly
    adapter = looped_layers(concat).adapter
    d = add.get_input_embeddings().embedding_dim
    assert looped_layers(concat).adapter_parameters() == [adapter.weight, adapter.bias]
    assert adapter.weight.shape == (d, 2 * d)
    with torch.no_grad():  # a trained adapter: [h; e] -> W [h; e] + c, checked against h + e at W = [2I 0]
        adapter.weight.zero_()
        adapter.weight[:, :d] = 2 * torch.eye(d)
    doubled = loopify(build(family, dtype=torch.float64), layers=(1, 3), n_loops=3, injection="none")
    hook = [m for m in looped_layers(doubled).range_layers()][0].register_forward_pre_hook(
        lambda m, args, kwargs: ((2 * args[0], *args[1:]), kwargs) if looped_layers(doubled).current_loop else None,
        with_kwargs=True,
    )
    assert torch.allclose(_logits(concat), _logits(doubled), atol=1e-12)
    hook.remove()
    concat.save_pretrained(tmp_path)
    again = loopscape.from_pretrained(tmp_path)
    assert again.config.loopscape["injection"] == "concat"
    assert torch.equal(looped_layers(again).adapter.weight, adapter.weight)
    assert torch.equal(_logits(again), _logits(concat))


def _unrolled_with_merged_lora(model, looped):
    """The looped Llama written out: the range's layers copied once per loop with W + B_t A_t merged into the
    chosen weights, run by HF's own forward (injection 'none', so unrolled and looped compute the same)."""
    unrolled = copy.deepcopy(model)
    loopify(unrolled, layers=(looped.start, looped.stop), n_loops=1, injection="none")
    looped_layers(unrolled).remove()
    layers = list(unrolled.model.layers)
    rng = range(looped.start, looped.stop)
    copies = []
    for t in range(1, looped.n_loops):
        for i in rng:
            layer = copy.deepcopy(layers[i])
            for name, m in layer.named_modules():
                key = f"{i}_{name.replace('.', '_')}"
                if key in looped.lora:
                    with torch.no_grad():
                        m.weight += looped.lora[key].B[t] @ looped.lora[key].A[t]
            copies.append(layer)
    for i in rng:  # loop 1 runs the layers themselves, with their own loop-0 difference merged
        for name, m in layers[i].named_modules():
            key = f"{i}_{name.replace('.', '_')}"
            if key in looped.lora:
                with torch.no_grad():
                    m.weight += looped.lora[key].B[0] @ looped.lora[key].A[0]
    new = layers[: looped.stop] + copies + layers[looped.stop :]
    for j, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    unrolled.model.layers = torch.nn.ModuleList(new)
    unrolled.config.num_hidden_layers = len(new)
    return unrolled


def test_per_loop_lora_starts_tied_and_equals_the_loop_written_out_with_merged_weights(tmp_path):
    tied = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, injection="none")
    model = loopify(
        build("llama", dtype=torch.float64),
        layers=(1, 3),
        n_loops=3,
        injection="none",
        loop_lora=2,
        lora_layers=["q_proj", "down_proj"],
    )
    assert torch.equal(_logits(model), _logits(tied))  # B = 0: the tied loop exactly
    looped = looped_layers(model)
    assert sorted(looped.lora) == ["1_mlp_down_proj", "1_self_attn_q_proj", "2_mlp_down_proj", "2_self_attn_q_proj"]
    q, down = model.model.layers[1].self_attn.q_proj, model.model.layers[1].mlp.down_proj
    per_loop = 2 * (q.in_features + q.out_features) + 2 * (down.in_features + down.out_features)
    assert sum(p.numel() for p in looped.lora_parameters()) == 2 * 3 * per_loop  # 2 layers, 3 loops
    torch.manual_seed(5)
    with torch.no_grad():
        for p in looped.lora_parameters():
            if p.dim() == 3 and p.shape[-1] == 2:  # B
                p.normal_(0, 0.05)
    out = _logits(model)
    assert not torch.allclose(out, _logits(tied))
    reference = _unrolled_with_merged_lora(model, looped)
    assert torch.allclose(out, _logits(reference), atol=1e-12)
    # FLOPs count each loop's own difference once
    base = flops_per_token(tied, 3)
    assert flops_per_token(model, 3) - base == 2.0 * 2 * 3 * per_loop  # 2 layers x 3 loops, 2 FLOPs a weight
    assert flops_per_token(model, 5) - flops_per_token(tied, 5) == 2.0 * 2 * 3 * per_loop  # loops 4, 5: shared
    model.save_pretrained(tmp_path)
    again = loopscape.from_pretrained(tmp_path)
    assert looped_layers(again).settings()["lora_layers"] == ["q_proj", "down_proj"]
    assert torch.equal(_logits(again), out)


def test_lora_is_saved_on_gpt2_conv1d_too(tmp_path):
    model = loopify(build("gpt2", dtype=torch.float64), layers=(0, 2), n_loops=2, loop_lora=1, lora_layers=["c_attn"])
    assert torch.equal(_logits(model), _logits(loopify(build("gpt2", dtype=torch.float64), layers=(0, 2), n_loops=2)))
    with torch.no_grad():
        for p in looped_layers(model).lora_parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(loopscape.from_pretrained(tmp_path)), _logits(model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loop_lora": 0}, "loop_lora must be an integer rank >= 1, or None for no per-loop LoRA (got 0)"),
        ({"lora_layers": ["q_proj"]}, "lora_layers goes with loop_lora (a rank); got lora_layers without it"),
        (
            {"loop_lora": 2, "lora_layers": ["qq_proj"]},
            "lora_layers must name linear layers of the looped range (got ['qq_proj']; there are [",
        ),
    ],
)
def test_bad_lora_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        loopify(build("llama"), layers=(1, 3), n_loops=2, **kwargs)
    assert str(error.value).startswith(message)


def test_retrofit_flops_count_truncation_the_adapter_and_lora_as_used():
    from loopscape.experiments.retrofit import step_flops

    x = IDS
    tokens = x.numel()
    plain = step_flops(build("llama"), x)
    layer = sum(p.numel() for p in build("llama").model.layers[1].parameters())
    full = step_flops(loopify(build("llama"), layers=(1, 3), n_loops=4), x)
    assert full - plain == 6 * tokens * 3 * 2 * layer  # three more passes through two layers
    k1 = step_flops(loopify(build("llama"), layers=(1, 3), n_loops=4, backprop_loops=1), x)
    assert full - k1 == 4 * tokens * 3 * 2 * layer  # the backward skips three of the four loops
    d = 32
    concat = step_flops(loopify(build("llama"), layers=(1, 3), n_loops=4, injection="concat"), x)
    adapter = 2 * d * d + d
    assert concat - full == 6 * tokens * 3 * adapter  # loops 2-4
    concat_k1 = step_flops(loopify(build("llama"), layers=(1, 3), n_loops=4, injection="concat", backprop_loops=1), x)
    assert concat_k1 - k1 == tokens * (2 * 3 * adapter + 4 * 1 * adapter)  # the last loop's backward has one


def test_a_checkpoint_saved_at_another_loop_count_loads_with_its_lora_and_truncation(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=4, loop_lora=2, backprop_loops=2)
    with torch.no_grad():
        for p in looped_layers(model).lora_parameters():
            p.add_(0.02)
    at_four = _logits(model)
    looped_layers(model).n_loops = 1  # SHIFT's Stage I, saved as it is
    model.save_pretrained(tmp_path)
    again = loopscape.from_pretrained(tmp_path)
    looped = looped_layers(again)
    assert looped.n_loops == 1 and looped.backprop_loops == 2 and looped.settings()["lora_loops"] == 4
    looped.n_loops = 4
    assert torch.allclose(_logits(again), at_four, rtol=0, atol=1e-12)  # the same weights (rounding aside)
