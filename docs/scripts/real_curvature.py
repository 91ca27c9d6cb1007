"""The Hessian of a real model's looped block split by loops (docs/integrations.md, "A real model"): layer 12's
``input_layernorm`` gains (576 weights) of SmolLM2-135M with layers 12..17 looped twice, on 2 rows x 32 tokens of
held-out pydoc prose (the first tokens of the last 10% of ``pydoc_data.topics``), float32, Lanczos and Hutch++
(``measure(k=3, exact=False)``); through every loop (no truncation). Either the untrained GGUF or a retrofitted
model saved by ``loopscape retrofit`` (``seed0/shift/model``)::

    python docs/scripts/real_curvature.py ~/.cache/loopscape/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf out.json
    python docs/scripts/real_curvature.py runs/retrofit-smollm2/seed0/shift/model out.json
"""

import json
import pydoc_data.topics
import sys
import time

import torch

from loopscape.landscape.loops import loop_hessian
from loopscape.looped import find_looped, from_pretrained, set_backprop_loops, set_n_loops
from loopscape.looped.io import gguf_file, load_tokenizer

PARAMS = "model.layers.12.input_layernorm.weight"


def main(path: str, out: str) -> None:
    torch.manual_seed(0)
    model = from_pretrained(path, layers=(12, 18)) if gguf_file(path) is not None else from_pretrained(path)
    model = model.float().eval()
    set_n_loops(model, 2)
    set_backprop_loops(model, None)  # the loss itself, not a truncated surrogate
    tokenizer = load_tokenizer(path)
    if tokenizer is None:  # a retrofit folder saves no tokenizer: the GGUF's
        from loopscape.real_models import model_path

        tokenizer = load_tokenizer(model_path("smollm2"))
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = torch.tensor(tokenizer(text[int(0.9 * len(text)) :], add_special_tokens=False)["input_ids"][:64])
    rows = ids.view(2, 32)
    t0 = time.perf_counter()
    m = loop_hessian(model, [{"input_ids": rows, "labels": rows}], params=PARAMS, dtype=torch.float32).measure(
        k=3, exact=False
    )
    result = {
        "model": path,
        "n_loops": find_looped(model).n_loops,
        "top": {part: m[part]["top"] for part in ("full", "diagonal", "cross")},
        "trace": {part: m[part]["trace"] for part in ("full", "diagonal", "cross")},
        "cross_share_top": m["cross_share_top"],
        "cross_share_trace": m["cross_share_trace"],
        "seconds": time.perf_counter() - t0,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
