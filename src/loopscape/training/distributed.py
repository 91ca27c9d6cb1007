"""Process-group set-up for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node N -m loopscape.cli algorithmic ...`` starts N
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous
address in the environment; :func:`init_distributed` joins them: NCCL on
CUDA (one GPU per process, by local rank), gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from loopscape.config import ConfigError


def init_distributed(device: str = "auto") -> int:
    """Join the ``torchrun`` process group (once); returns this process's rank."""
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): the process group's once joined, else what ``torchrun`` put in the environment
    (``(0, 1)`` in a plain process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def on_rank0(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` on rank 0 alone (what writes files), every rank waiting for it; should it fail
    there (a refused run folder, a full disk), every rank raises, so that none waits for rank 0 forever: the
    same error on rank 0, a ``ConfigError`` (for a ``ValueError``) or ``RuntimeError`` with its message on the
    others."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        fn(*args, **kwargs)
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            fn(*args, **kwargs)
        except Exception as error:  # told to every rank below, then raised here as it was
            failure = error
    told = [None if failure is None else (isinstance(failure, ValueError), str(failure))]
    dist.broadcast_object_list(told, src=0)
    if failure is not None:
        raise failure
    if told[0] is not None:
        bad_input, message = told[0]
        raise (ConfigError if bad_input else RuntimeError)(f"rank 0: {message}")


PARALLEL = ("ddp", "fsdp")


def data_parallel(model: nn.Module, layers: list[nn.Module], how: str) -> nn.Module:
    """``model`` for data-parallel training over the process group; returns the module to call. ``"ddp"``:
    ``DistributedDataParallel``. ``"fsdp"``: PyTorch's FSDP2 (``fully_shard``) on each of ``layers`` (a
    decoder's blocks) and on the root, so a looped block is gathered again at each of its loops and its
    gradients reduced once per backward. The model itself keeps its methods (FSDP2 shards in place)."""
    if how not in PARALLEL:
        raise ValueError(f"parallel must be one of {list(PARALLEL)} (got {how!r})")
    if how == "ddp":
        # a loop's own weights (the concat adapter, the LoRA of later loops) are unused at one loop (Stage I)
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 has it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_gathered_checkpoint(
    directory, done: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, unit: str = "step"
) -> None:
    """A data-parallel (DDP or FSDP) model's checkpoint in :mod:`loopscape.training.checkpoint`'s format: the
    full weights and optimiser state gathered from every rank (all ranks call this), written by rank 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from loopscape.training.checkpoint import write_checkpoint

    weights, optim = get_state_dict(model, optimizer, options=_full_options())
    if dist.get_rank() == 0:
        tensors, scalars = {}, {}
        for name, fields in optim["state"].items():
            for field, value in fields.items():
                (tensors if torch.is_tensor(value) else scalars)[f"{name}.{field}"] = value
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
        meta = {"param_groups": groups, "scalars": scalars}
        write_checkpoint(directory, weights, tensors, {"unit": unit, "done": done, "optimizer": meta, "extra": extra})
    dist.barrier()  # no rank goes on (or is killed into a resume) before the checkpoint is whole


def load_gathered_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore :func:`save_gathered_checkpoint`'s files on every rank (each reads them); returns ``state.json``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_state_dict,
    )

    from loopscape.training.checkpoint import read_checkpoint

    weights, tensors, state = read_checkpoint(path)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    fields: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
        name, field = key.rsplit(".", 1)
        fields.setdefault(name, {})[field] = value
    groups = [
        {**group, **saved, "params": group["params"]}
        for group, saved in zip(optim["param_groups"], state["optimizer"]["param_groups"])
    ]
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict={"state": fields, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )
    return state
