"""Run by tests/test_retrofit_distributed.py under ``torchrun --nproc_per_node 2``: a tiny looped Llama in
float64 (layers 1..2 looped 3 times, truncated backprop through the last 2), wrapped by DDP or FSDP2; each
rank takes its half of one batch. Writes, per rank, the gradient of every weight (gathered in full), and the
step at which an SCP schedule switched though the ranks' validation losses differ."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parents[1]))  # torchrun puts this folder on the path, not tests/

from hf_families import tiny_llama  # noqa: E402

from loopscape.looped import loopify  # noqa: E402
from loopscape.looped.structure import Structure  # noqa: E402
from loopscape.shift.controller import ShiftController  # noqa: E402
from loopscape.shift.criterion import ShiftCriterion  # noqa: E402
from loopscape.shift.schedule import ShiftSchedule  # noqa: E402
from loopscape.training.distributed import data_parallel, init_distributed  # noqa: E402


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_llama(vocab_size=64, hidden_size=16, max_position_embeddings=32)
    return loopify(transformers.LlamaForCausalLM(config).double(), layers=(1, 3), n_loops=3, backprop_loops=2)


def main(how: str, out: str) -> None:
    rank = init_distributed("cpu")
    world = dist.get_world_size()
    model = tiny()
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    if how == "one":  # the reference: one process, the whole batch
        model(input_ids=x, labels=x).loss.backward()
    else:
        run = data_parallel(model, Structure(model).layers, how)
        part = x[rank::world]
        run(input_ids=part, labels=part).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    # SCP decides on each rank's own validation loss; the controller agrees across ranks (rank 1's loss keeps
    # falling, so alone it would never switch)
    schedule = ShiftSchedule.scp(3, ShiftCriterion(patience=2, min_delta=0.05, wait=1, max_wait=1))
    controller = ShiftController(schedule, model)
    depths = []
    for step in range(1, 16):
        depths.append(controller.before_step(step))
        controller.after_evaluation(step, 1.0 - 0.3 * rank * step, 1.0)
    # Stage I of a concat-injection model: one loop leaves the adapter unused, which DDP must allow
    stage1 = loopify(tiny(), layers=(1, 3), n_loops=1, injection="concat")
    run = data_parallel(stage1, Structure(stage1).layers, how) if how != "one" else stage1
    for _ in range(2):
        run(input_ids=x[rank::world], labels=x[rank::world]).loss.backward()
    torch.save({"grads": grads, "depths": depths, "stage1_steps": 2}, f"{out}/{how}-rank{rank}.pt")
    dist.barrier()  # both ranks have written
    # torch's gloo process group can deadlock in its destructor (the main thread joins a worker thread that
    # waits for the GIL the main thread holds; seen once in CI with torch 2.13): leave without destroying it
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
