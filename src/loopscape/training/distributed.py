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


def init_distributed(device: str = "auto") -> int:
    """Join the ``torchrun`` process group (once); returns this process's rank."""
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank()
