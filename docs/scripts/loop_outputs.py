"""Outputs of loopify, the cache, the sweep and the loop-split Hessian on tiny models, saved for a bit-for-bit
comparison of two trees (issue 35's refactor was checked this way against abc6561):

    PYTHONPATH=OLD_TREE/src python docs/scripts/loop_outputs.py /tmp/before.pt
    PYTHONPATH=src python docs/scripts/loop_outputs.py /tmp/after.pt
    python docs/scripts/compare_outputs.py /tmp/before.pt /tmp/after.pt

Logits of five families x three injections, per-loop LoRA and three exits, greedy generation with the cache,
the sweep's perplexities, convergence, exits and FLOPs, and the Hessian spectra split by loops (toy, looped GPT,
loopified Llama). Imports the names of either layout (integrations/ before issue 35, looped/ after).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from hf_families import V, build  # noqa: E402

try:
    from loopscape.looped.decoder import loopify, set_exit
    from loopscape.looped.sweep import loop_sweep
except ImportError:
    from loopscape.integrations.loop_sweep import loop_sweep
    from loopscape.integrations.loopify import loopify, set_exit
from loopscape.landscape.loops import loop_hessian  # noqa: E402
from loopscape.models.linear_attn import looped_attn  # noqa: E402
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig  # noqa: E402


def main(out):
    res = {}
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for fam in ("gpt2", "llama", "gemma", "qwen3", "gpt_neox"):
        for inj in ("add", "none", "concat"):
            m = loopify(build(fam), layers=(1, 3), n_loops=3, injection=inj)
            with torch.no_grad():
                res[f"{fam}-{inj}"] = m(input_ids=ids).logits
        m = loopify(build(fam), layers=(1, 3), n_loops=3, loop_lora=2)
        with torch.no_grad():
            res[f"{fam}-lora"] = m(input_ids=ids).logits
            for ex in ("state",):  # kl, entropy: refused on a range with layers after it (issue 37)
                set_exit(m, ex, 0.05, 1)
                res[f"{fam}-exit-{ex}"] = m(input_ids=ids).logits
            set_exit(m, None)
            g = m.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
            res[f"{fam}-gen"] = g
        batches = [{"input_ids": ids}]
        s = loop_sweep(m, batches, [1, 2, 3, 4], thresholds=[0.0, 0.1], exit="state")
        res[f"{fam}-sweep-ppl"] = torch.tensor([r["perplexity"] for r in s["counts"]], dtype=torch.float64)
        res[f"{fam}-sweep-conv"] = torch.tensor(s["convergence"], dtype=torch.float64)
        res[f"{fam}-sweep-exit"] = torch.tensor([e["mean_loops"] for e in s["exits"]], dtype=torch.float64)
        res[f"{fam}-sweep-flops"] = torch.tensor([r["flops_per_token"] for r in s["counts"]], dtype=torch.float64)
    torch.manual_seed(0)
    toy = looped_attn(n_loops=3, vocab_size=3, max_len=3).double()
    data = [(torch.randint(0, 3, (8, 3)), torch.randint(0, 3, (8,)))]
    mm = loop_hessian(toy, data).measure(k=3)
    for part in ("full", "diagonal", "cross"):
        res[f"toy-{part}"] = torch.tensor(mm[part]["eigenvalues"], dtype=torch.float64)
    gpt = LoopedGPT(LoopedGPTConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1)).double().eval()
    from loopscape.training.algorithmic import ScoredRows, scored_rows_loss

    x = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    at_three = ScoredRows(gpt, torch.full((3,), 3))  # every row read after 3 loops
    y = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(2))
    mm = loop_hessian(at_three, [(x, y)], params="model.layers.0.attn.proj.*", loss_fn=scored_rows_loss).measure(k=2)
    for part in ("full", "diagonal"):
        res[f"gpt-{part}"] = torch.tensor(mm[part]["eigenvalues"], dtype=torch.float64)
    llama = loopify(build("llama", n_layer=3, dtype=torch.float64), layers=(1, 2), n_loops=2)
    hf = [{"input_ids": ids, "labels": ids}]
    mm = loop_hessian(llama, hf, params="model.layers.1.post_attention_layernorm.weight").measure(k=2)
    for part in ("full", "diagonal"):
        res[f"llama-{part}"] = torch.tensor(mm[part]["eigenvalues"], dtype=torch.float64)
    torch.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1])
