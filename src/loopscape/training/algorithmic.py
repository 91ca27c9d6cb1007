"""Training the looped GPT on an algorithmic task (Appendix E.2): Single-Attn,
Looped-Attn and SHIFT, on one process or data-parallel (DDP under ``torchrun``).

Every step draws a fresh batch from the length curriculum. Single-Attn reads
every sample after one step; Looped-Attn after its own ``T(n)`` loops, with
the loss at that step only and gradients through every step. SHIFT trains
Single-Attn and switches to Looped-Attn at a fixed step or when SCP
(:class:`~loopscape.shift.criterion.ShiftCriterion`) fires on the periodic
validation (:class:`~loopscape.shift.schedule.ShiftSchedule`: steps up to the
switch step are Single-Attn); the optimiser state is kept.

AdamW, constant learning rate until the curriculum ends, then cosine decay to
0; gradient clipping at norm 1.0 (spec). Every ``eval_every`` steps one row is
appended to ``metrics.jsonl``: training loss and exact-match accuracy (mean
over the steps since the last row), validation loss and accuracy on a fixed
set drawn from the full training distribution (read at the paradigm's own
steps), ``grad_norm`` (the mean over the steps since the last row of each
step's gradient norm before clipping: the number SCP reads here, ``step_mean``
in :data:`~loopscape.shift.criterion.GRAD_NORMS`), learning rate, loops per
sample, cumulative FLOPs and wall time.

Data parallelism: every rank draws the same global batch from the same
generator and trains on its shard; each shard's loss is divided by the
*global* count of scored positions, so the averaged gradient is exactly the
one-process gradient of the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from loopscape.config import ConfigError, require
from loopscape.data.algorithmic import AlgorithmicBatch, AlgorithmicTask, Curriculum
from loopscape.errors import DivergenceError
from loopscape.landscape.probe import CurvatureProbe
from loopscape.models.looped_gpt import LoopedGPT, exact_match, flops_per_token_step
from loopscape.shift.controller import STATE_KEY, ShiftController, saved_state
from loopscape.shift.schedule import SWITCH_KEY, ShiftConfig
from loopscape.training.run import RunState, check_finite

PARADIGMS = ("single", "looped", "shift")
PRECISIONS = ("fp32", "bf16")


@dataclass
class AlgorithmicTrainConfig:
    """Optimisation and run settings (defaults: the paper's, Appendix E.2 and spec)."""

    steps: int = 50_001
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01  # open: PyTorch's AdamW default
    grad_clip: float = 1.0
    curriculum_interval: int = 500  # the authors' for Parity; the presets give each task's (spec)
    eval_every: int = 500
    eval_size: int = 512
    checkpoint_every: int = 2000
    # at: the last Single-Attn step; else SCP (scp, counted in evaluations). n_loops is refused: each row's T(n)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    precision: str = "fp32"
    compile: bool = False
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars (run_dir/tensorboard)
    curvature_every: int | None = None  # CurvatureProbe on the first curvature_rows validation rows (None: off)
    curvature_rows: int = 16  # with the probe's 4 x 16 products every 500 steps: under 10% of the training time
    curvature_k: int = 5
    curvature_params: str | None = None  # a name pattern (e.g. "model.layers.0.*"); None: every parameter
    device: str = "auto"

    @staticmethod
    def upgrade(data: dict) -> dict:
        """Run folders (and ``--set``) from before the ``shift`` section: ``shift_at`` and ``scp`` move into
        it (``train.scp`` is ``train.shift.scp``); a fixed ``shift_at`` drops ``scp``, as it always did."""
        at, scp = data.pop("shift_at", None), data.pop("scp", None)
        if at is not None or scp is not None:
            shift = dict(data.get("shift") or {})
            shift.update({"at": at, "scp": None} if at is not None else {"scp": scp})
            data["shift"] = shift
        return data

    def validate(self, p: str = "") -> None:
        for name in ("steps", "batch_size", "curriculum_interval", "eval_every", "eval_size", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"{p}{name}", "an integer >= 1", getattr(self, name))
        require(self.lr > 0, f"{p}lr", "a number > 0", self.lr)
        require(self.weight_decay >= 0, f"{p}weight_decay", "a number >= 0", self.weight_decay)
        require(self.grad_clip > 0, f"{p}grad_clip", "a number > 0", self.grad_clip)
        require(
            self.shift.milestones is None and self.shift.depth == "fixed" and self.shift.ramp is None,
            f"{p}shift",
            "a fixed switch (at) or SCP (scp): the looped stage runs each row's own T(n), so milestones, a "
            "depth distribution and a ramp do not apply",
            {"milestones": self.shift.milestones, "depth": self.shift.depth, "ramp": self.shift.ramp},
        )
        if self.shift.n_loops != ShiftConfig.n_loops:
            raise ConfigError(
                f"{p}shift.n_loops is not used by the algorithmic study: its loop count is T(n) per row "
                f"(got {self.shift.n_loops!r}; leave it out)"
            )
        self.shift.validate(f"{p}shift.")
        require(
            self.curvature_every is None or self.curvature_every >= 1,
            f"{p}curvature_every",
            "null (off) or an integer >= 1",
            self.curvature_every,
        )
        require(self.curvature_rows >= 1, f"{p}curvature_rows", "an integer >= 1", self.curvature_rows)
        require(self.curvature_k >= 1, f"{p}curvature_k", "an integer >= 1", self.curvature_k)
        require(self.precision in PRECISIONS, f"{p}precision", f"one of {PRECISIONS}", self.precision)
        require(
            not self.device.startswith("cuda") or torch.cuda.is_available(),
            f"{p}device",
            "auto or cpu: CUDA is not available on this machine",
            self.device,
        )
        require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"{p}device",
            "auto, cpu, cuda or cuda:<index>",
            self.device,
        )


def lr_at(step: int, config: AlgorithmicTrainConfig, curriculum_end: int) -> float:
    """Constant until the curriculum ends, then cosine decay to 0 at the last step."""
    if step < curriculum_end or config.steps <= curriculum_end:
        return config.lr
    progress = (step - curriculum_end) / max(1, config.steps - curriculum_end)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def masked_loss(logits: torch.Tensor, batch: AlgorithmicBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of scored cross-entropies, per-row exact match)``."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none").view(
        batch.targets.shape
    )
    return (nll * batch.mask).sum(), exact_match(logits.argmax(-1), batch.targets, batch.mask)


def step_flops(config, batch: AlgorithmicBatch, n_loops: torch.Tensor) -> float:
    """Training FLOPs of one batch: forward (read-in, ``n_loops_i`` block loops per row, read-out)
    and backward counted as twice the forward of what it goes through: with truncated backprop
    (``config.backprop_loops = k``) the last ``min(k, n_loops_i)`` loops of each row. The linear read-in
    multiplies the one-hot tokens (as the authors' code does); an embedding table is a lookup."""
    width = batch.inputs.shape[1]
    per_loop = flops_per_token_step(config, width) * width
    k = getattr(config, "backprop_loops", None)
    backward_loops = n_loops if k is None else n_loops.clamp(max=k)
    head = 2 * config.d_model * config.vocab_size * width * len(n_loops)
    read_in = head if config.read_in == "linear" else 0
    forward = read_in + per_loop * float(n_loops.sum()) + head
    return forward + 2 * (read_in + per_loop * float(backward_loops.sum()) + head)


def shift_controller(paradigm: str, config: AlgorithmicTrainConfig, optimizer) -> ShiftController | None:
    """SHIFT (``train.shift``: a fixed switch step or SCP) as the controller every trainer drives; None for
    Single-Attn and Looped-Attn. It holds no model: the trainer asks its schedule for the stage, and the looped
    stage reads each row at its own ``T(n)``. SCP reads each row's ``val_loss`` and ``grad_norm``
    (``step_mean``)."""
    if paradigm != "shift":
        return None
    return ShiftController(config.shift.build(), optimizer=optimizer, grad_norm="step_mean")


class ScoredRows(torch.nn.Module):
    """The looped GPT read at fixed per-row loop counts, for the Hessian of the training loss on fixed
    rows (:class:`~loopscape.landscape.probe.CurvatureProbe`): ``forward(x)`` is ``model(x, n_loops)``."""

    def __init__(self, model: LoopedGPT, n_loops: torch.Tensor):
        super().__init__()
        self.model, self.n_loops = model, n_loops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.n_loops)


def scored_rows_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the summed cross-entropy of its scored positions (targets -100 elsewhere)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)


def curvature_probe(val: AlgorithmicBatch, config: AlgorithmicTrainConfig, folder: Path | None):
    """The probe of a run: its first ``curvature_rows`` validation rows, weighted so the probe's loss
    is the training loss on them (scored positions, each weighing 1/their count)."""
    n = config.curvature_rows
    rows = AlgorithmicBatch(*(t[:n] for t in (val.inputs, val.targets, val.mask, val.n_loops, val.lengths)))
    targets = torch.where(rows.mask, rows.targets, -100)
    weights = torch.full((len(targets),), 1.0 / float(rows.mask.sum()), dtype=torch.float64)
    batches = [(rows.inputs, targets, weights)]
    probe = CurvatureProbe(
        batches,
        every=config.curvature_every,
        k=config.curvature_k,
        params=config.curvature_params,
        folder=folder,
        loss_fn=scored_rows_loss,
    )
    return probe, rows


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA if available. A bare ``cuda`` becomes the current device (set per rank under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_batch(
    model: LoopedGPT, batch: AlgorithmicBatch, n_loops: torch.Tensor, precision: str = "fp32"
) -> tuple[float, float]:
    """``(mean scored cross-entropy, exact-match accuracy)`` read at ``n_loops``."""
    with _autocast(batch.inputs.device, precision):
        logits = model(batch.inputs, n_loops)
    loss, correct = masked_loss(logits, batch)
    return (loss / batch.mask.sum()).item(), correct.float().mean().item()


def make_optimizer(model: torch.nn.Module, config: AlgorithmicTrainConfig) -> torch.optim.AdamW:
    """AdamW (spec), with torch's fused kernel where this build has one for the
    parameters' device (CPU from torch 2.4, CUDA): one kernel per step instead of
    several per parameter tensor (docs/algorithmic.md gives the measured saving)."""
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch build
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: AlgorithmicBatch,
    n_loops: torch.Tensor,
    config: AlgorithmicTrainConfig,
    world: int = 1,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step on this rank's shard of ``batch``, each row read at ``n_loops``.

    ``net``: the model, or its DistributedDataParallel wrapper. The shard's summed
    loss is divided by the *global* count of scored positions (times ``world``,
    since DDP averages gradients over ranks), so every world size takes the
    one-process step. Returns ``(summed scored cross-entropy of the shard, per-row
    exact match of the shard, gradient norm before clipping)``, as tensors, so the
    step adds no host sync beyond the one the per-sample forward makes to size its loop.
    """
    shard, shard_loops = batch.split(world, rank), n_loops.tensor_split(world)[rank]
    net.train()
    with _autocast(batch.inputs.device, config.precision):
        logits = net(shard.inputs, shard_loops)
    loss_sum, correct = masked_loss(logits, shard)
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * world / batch.mask.sum()).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
    optimizer.step()
    return loss_sum.detach(), correct, grad_norm


def train_algorithmic(
    model: LoopedGPT,
    task: AlgorithmicTask,
    paradigm: str,
    config: AlgorithmicTrainConfig,
    curriculum: Curriculum,
    run_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place; returns the metrics rows (rank 0 writes ``run_dir``).
    ``on_step(step)`` is called at every evaluation.

    Under ``torchrun`` (an initialised process group) the model is wrapped in
    DistributedDataParallel and each rank trains on its shard of the global batch.
    """
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS} (got {paradigm!r})")
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(seed)
    val_gen = torch.Generator(device=device).manual_seed(
        10_000 + seed
    )  # a fixed set from the full training distribution
    val = task.batch(curriculum.lengths(curriculum.end_step, config.eval_size, val_gen, device), val_gen)
    shift = shift_controller(paradigm, config, optimizer)

    def looped(step: int) -> bool:
        return paradigm == "looped" or (shift is not None and shift.schedule.stage(step) == 2)

    totals = {"flops": 0.0, "time_s": 0.0}
    window = {
        "loss": 0.0,
        "correct": 0.0,
        "rows": 0,
        "grad": 0.0,
        "n": 0,
        "loops": 0.0,
    }  # running means between evaluations
    run = RunState(
        run_dir, config.steps, config.checkpoint_every, unit="step", write=rank == 0, tensorboard=config.tensorboard
    )
    probe = probe_rows = None
    if config.curvature_every is not None and rank == 0:
        probe, probe_rows = curvature_probe(val, config, Path(run_dir) / "curvature")
    extra = run.resume(model, optimizer, generator) if resume else {}
    if extra:
        totals, window = extra["totals"], extra["window"]
        if shift is not None:
            shift.load_state_dict(saved_state(extra))
        if probe is not None and "curvature" in extra:
            probe.load_state_dict(extra["curvature"])
    net = model
    if distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:  # layer by layer: the loop over loops stays in Python, shapes vary per step
        for layer in model.layers:
            layer.compile(dynamic=True)
    try:
        with run.open_log() as log:
            for step in range(run.start + 1, config.steps + 1):
                t0 = time.perf_counter()
                lr = lr_at(step, config, curriculum.end_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if shift is not None:
                    shift.before_step(step)
                batch = task.batch(curriculum.lengths(step, config.batch_size, generator, device), generator)
                n_loops = batch.n_loops if looped(step) else torch.ones_like(batch.n_loops)
                loss_sum, correct, grad_norm = train_step(net, optimizer, batch, n_loops, config, world, rank)
                totals["flops"] += step_flops(model.config, batch, n_loops)
                totals["time_s"] += time.perf_counter() - t0
                shard_stats = torch.stack([loss_sum.float(), correct.float().sum()])
                if distributed:
                    dist.all_reduce(shard_stats)
                # one host sync per step for the logged numbers (each .item() would wait for the device)
                loss_v, correct_v, grad_v, mask_v, loops_v = torch.cat(
                    [shard_stats, torch.stack([grad_norm.float(), batch.mask.sum().float(), n_loops.float().mean()])]
                ).tolist()
                where = f"{run.run_dir} ({paradigm}), step {step}"
                check_finite({"loss": loss_v, "grad_norm": grad_v}, where, f"train.lr (now {config.lr})")
                window["loss"] += loss_v / mask_v
                window["correct"] += correct_v
                window["rows"] += len(batch.n_loops)
                window["grad"] += grad_v
                window["n"] += 1
                window["loops"] += loops_v
                if probe is not None and step % probe.every == 0:  # timed apart: what tracking adds to training
                    t1 = time.perf_counter()
                    loops = probe_rows.n_loops if looped(step) else torch.ones_like(probe_rows.n_loops)
                    probe.maybe_measure(ScoredRows(model, loops), step)
                    totals["curvature_s"] = totals.get("curvature_s", 0.0) + time.perf_counter() - t1
                evaluating = step % config.eval_every == 0 or step == config.steps
                if evaluating:
                    model.eval()
                    val_loops = val.n_loops if looped(step) else torch.ones_like(val.n_loops)
                    val_loss, val_acc = evaluate_batch(model, val, val_loops, config.precision)
                    row = {
                        "step": step,
                        "paradigm": "looped" if looped(step) else "single",
                        "train_loss": window["loss"] / window["n"],
                        "train_acc": window["correct"] / window["rows"],
                        "val_loss": val_loss,
                        "val_acc": val_acc,
                        "grad_norm": window["grad"] / window["n"],
                        "lr": lr,
                        "max_len": curriculum.current_max(step) - 1,
                        "loops_per_sample": window["loops"] / window["n"],
                        "flops": totals["flops"],
                        "time_s": totals["time_s"],
                    }
                    if probe is not None:
                        row["curvature_time_s"] = totals.get("curvature_s", 0.0)
                    if shift is not None:
                        shift.after_evaluation(step, val_loss, row["grad_norm"])
                        if shift.schedule.shifted_by(step):
                            row[SWITCH_KEY] = shift.schedule.shift_step
                    window = dict.fromkeys(window, 0.0)
                    log.append(row)
                if run.checkpoint_due(step):
                    extra = {"totals": totals, "window": window, "paradigm": paradigm}
                    if shift is not None:
                        extra[STATE_KEY] = shift.state_dict()
                    if probe is not None:
                        extra["curvature"] = probe.state_dict()
                    run.save(step, model, optimizer, generator, extra=extra)
                if on_step is not None and evaluating:
                    on_step(step)
    except DivergenceError as err:
        run.fail(err)
        raise
    return run.finish(model, metadata={"paradigm": paradigm, "task": task.name})
