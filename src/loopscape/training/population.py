"""Many toy runs at once: one vmapped model, one Adam with a step count per member.

The SHIFT study (Figure 4) trains dozens of runs of the same tiny model that
differ only in their seed and their loop schedule. One step of one run is a
few microseconds of arithmetic under a millisecond of Python and dispatch, so
running them one by one measures overhead. Here they train together:

* parameters are stacked along a leading *member* axis
  (``torch.func.stack_module_state``) and the model's own ``forward``, which
  broadcasts over leading axes, runs all members in one pass, every member reading its own mini-batch in its own seeded
  order (the order :func:`~loopscape.training.markov.train_markov` uses);
* every member runs ``T_max`` loops and reads its logits at its own loop count
  (``forward(all_loops=True)``: step ``t`` is exactly the model with ``t`` loops);
* the summed loss gives each member the gradient of its own mean loss, and
  Adam is elementwise, so :class:`MemberAdam` updates each member as its own
  Adam would; it keeps one step count per member so that a member may reset its
  moments at its shift while the others keep theirs.

A member therefore follows the run that :func:`~loopscape.training.markov.train_markov`
with the same :class:`~loopscape.shift.schedule.ShiftSchedule` gives for the same
seed, up to float rounding (tested). Per-member wall time cannot be measured
here; compute is accounted per epoch from the architecture in use
(:mod:`loopscape.shift.compute`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, stack_module_state

from loopscape.data.markov import MarkovTask
from loopscape.errors import DivergenceError
from loopscape.shift.controller import STATE_KEY, ShiftController, saved_state
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.checkpoint import generator_state, set_generator_state
from loopscape.training.markov import MarkovTrainConfig, scores
from loopscape.training.run import RunState, check_finite


class MemberAdam(torch.optim.Optimizer):
    """``torch.optim.Adam``'s update (no weight decay, no amsgrad) on parameters
    whose first axis indexes members, with a step count per member."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                shape = (-1,) + (1,) * (p.dim() - 1)
                # bias corrections in float64 as torch.optim.Adam computes them in Python floats
                step_size = (group["lr"] / (1 - b1 ** state["step"])).to(p).view(shape)
                bc2_sqrt = (1 - b2 ** state["step"]).sqrt().to(p).view(shape)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])
                p.sub_(step_size * state["exp_avg"] / denom)

    def reset(self, member: int) -> None:
        """Forget one member's moments and step count (SHIFT's ``optimizer="reset"``)."""
        for state in self.state.values():
            for value in state.values():
                value[member] = 0


class _Member:
    """Member ``k``'s loop count (its entry of the population's ``loops``), as its
    :class:`~loopscape.shift.controller.ShiftController` sets it."""

    def __init__(self, loops: torch.Tensor, k: int):
        self.loops, self.k = loops, k

    @property
    def n_loops(self) -> int:
        return int(self.loops[self.k])

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        self.loops[self.k] = value


class Population(nn.Module):
    """``S`` models of one architecture with stacked parameters.

    ``template`` supplies the architecture and its (shared, fixed) buffers; it
    should have the largest loop count any member will use.
    """

    def __init__(self, template: nn.Module, members: Sequence[nn.Module]):
        super().__init__()
        params, _ = stack_module_state(list(members))
        self.names = list(params)
        # keys as in the model ('.' is not allowed in a ParameterDict key)
        self.stacked = nn.ParameterDict(
            {k.replace(".", "__"): nn.Parameter(v.detach().clone()) for k, v in params.items()}
        )
        self.template = template.requires_grad_(False)

    def params(self) -> dict[str, nn.Parameter]:
        """The stacked parameters under the model's own names."""
        return {n: self.stacked[n.replace(".", "__")] for n in self.names}

    def __len__(self) -> int:
        return next(iter(self.stacked.values())).shape[0]

    def forward(self, x: torch.Tensor, n_loops: torch.Tensor) -> torch.Tensor:
        """Logits ``(S, B, V)``; ``x`` is ``(S, B, n)`` (one batch per member) or
        ``(B, n)`` (shared); ``n_loops`` ``(S,)`` holds each member's loop count.

        The template's forward broadcasts over leading axes, so weights
        ``(S, 1, ...)`` against inputs ``(S, B, ...)`` run every member in one
        pass (``torch.func.vmap`` gives the same numbers at several times the
        dispatch cost on models this small).
        """
        params = {k: p.unsqueeze(1) for k, p in self.params().items()}
        if x.dim() == 2:
            x = x.expand(len(self), *x.shape)
        logits = functional_call(self.template, params, (x,), {"all_loops": True})  # (S, B, T_max, V)
        return logits[torch.arange(len(self), device=x.device), :, n_loops - 1]

    def member(self, k: int, n_loops: int) -> nn.Module:
        """Member ``k`` as a stand-alone model (a copy) with ``n_loops`` loops."""
        return member_model(self.template, {n: p[k] for n, p in self.params().items()}, n_loops)


def member_model(template: nn.Module, params: dict[str, torch.Tensor], n_loops: int) -> nn.Module:
    model = copy.deepcopy(template).requires_grad_(True)
    model.load_state_dict({n: p.detach().clone() for n, p in params.items()}, strict=False)
    model.n_loops = n_loops
    return model


def load_member(path: str | Path, template: nn.Module, k: int, n_loops: int) -> nn.Module:
    """Member ``k`` of a population saved by :func:`train_population` (``model.safetensors``)."""
    saved = load_file(str(path))
    prefix = "stacked."
    return member_model(
        template, {n[len(prefix) :].replace("__", "."): v[k] for n, v in saved.items() if n.startswith(prefix)}, n_loops
    )


def _evaluate(pop: Population, n_loops: torch.Tensor, task: MarkovTask) -> dict[str, list[float]]:
    logits = pop(task.train.inputs, n_loops)
    with torch.no_grad():
        val_logits = pop(task.val.inputs, n_loops)
    row = scores(logits, val_logits, task)
    grads = torch.autograd.grad(row["train_loss"].sum(), list(pop.stacked.values()))
    row["grad_norm"] = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    return {k: v.tolist() for k, v in row.items()}


def train_population(
    models: Sequence[nn.Module],
    seeds: Sequence[int],
    schedules: Sequence[ShiftSchedule],
    task: MarkovTask,
    config: MarkovTrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train member ``k`` = (``models[k]``, batch order of ``seeds[k]``, loop schedule
    ``schedules[k]``) for ``config.epochs`` epochs, all at once.

    ``metrics.jsonl`` has one row per epoch whose values are lists over members
    (the keys of :func:`~loopscape.training.markov.evaluate`, plus ``n_loops``);
    ``time_s`` is the whole population's epoch. SCP reads each member's
    ``val_loss`` and ``grad_norm`` (its full-batch gradient norm, ``full_batch``).
    Checkpoints every ``config.checkpoint_every`` epochs (the controllers' states
    as one list under ``shift_state``); ``resume=True`` continues from the latest
    and ends with the same numbers. Each schedule's ``shift_step`` is set when
    it decides. Returns every row.
    """
    if not (len(models) == len(seeds) == len(schedules)) or not models:
        raise ValueError("models, seeds and schedules must be non-empty and of one length")
    template = copy.deepcopy(models[0])
    template.n_loops = max(s.n_loops for s in schedules)
    pop = Population(template, models)
    optimizer = MemberAdam(pop.stacked.parameters(), lr=config.lr)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    run = RunState(run_dir, config.epochs, config.checkpoint_every, unit="epoch", tensorboard=config.tensorboard)
    extra = run.resume(pop, optimizer) if resume else {}
    loops = torch.ones(len(schedules), dtype=torch.long)  # each member's loop count, set by its controller
    # member k's controller sets its loop count and, at a stage change with optimizer="reset", its moments alone
    shifts = [
        ShiftController(s, _Member(loops, k), reset=partial(optimizer.reset, k), grad_norm="full_batch")
        for k, s in enumerate(schedules)
    ]
    if extra:
        for g, text in zip(generators, extra["generators"]):
            set_generator_state(g, text)
        for c, state in zip(shifts, saved_state(extra)):
            c.load_state_dict(state)
    for c in shifts:
        c.before_step(run.start + 1)
    n = len(task.train)
    inputs, targets = task.train.inputs, task.train.targets

    def checked(row: dict) -> dict:
        """The row, once every member's loss and gradient are finite (else the run stops, marked failed)."""
        for k, seed in enumerate(seeds):
            where = f"{run.run_dir}, member {k} (seed {seed}), epoch {row['epoch']}"
            values = {key: row[key][k] for key in ("train_loss", "grad_norm")}
            check_finite(values, where, f"train.lr (now {config.lr})")
        return row

    try:
        with run.open_log() as log:
            if run.start == 0:
                log.append(
                    checked({"epoch": 0, **_evaluate(pop, loops, task), "time_s": 0.0, "n_loops": loops.tolist()})
                )
            for epoch in range(run.start + 1, config.epochs + 1):
                for c in shifts:  # applied already after the last evaluation; a sampled depth draws anew there
                    c.before_step(epoch)
                t0 = time.perf_counter()
                order = torch.stack([torch.randperm(n, generator=g) for g in generators])  # (S, n)
                for idx in order.split(config.batch_size, dim=1):
                    logits = pop(inputs[idx], loops)
                    nll = -torch.log_softmax(logits, -1).gather(-1, targets[idx].unsqueeze(-1)).squeeze(-1)
                    optimizer.zero_grad(set_to_none=True)
                    nll.mean(1).sum().backward()  # member k's slice gets the gradient of its own mean loss
                    optimizer.step()
                elapsed = time.perf_counter() - t0
                row = checked(
                    {"epoch": epoch, **_evaluate(pop, loops, task), "time_s": elapsed, "n_loops": loops.tolist()}
                )
                log.append(row)
                for k, c in enumerate(shifts):
                    c.after_evaluation(epoch, row["val_loss"][k], row["grad_norm"][k])
                    c.before_step(epoch + 1)  # the next epoch's stage, applied before this epoch's checkpoint
                if run.checkpoint_due(epoch):
                    extra = {
                        "generators": [generator_state(g) for g in generators],
                        STATE_KEY: [c.state_dict() for c in shifts],
                    }
                    run.save(epoch, pop, optimizer, extra=extra)
                if on_epoch is not None:
                    on_epoch(epoch)
    except DivergenceError as err:
        run.fail(err)
        raise
    return run.finish(pop)


def member_curves(rows: list[dict]) -> dict[str, np.ndarray]:
    """``{metric: array (members, epochs + 1)}`` from population rows."""
    keys = [k for k, v in rows[0].items() if isinstance(v, list)]
    return {k: np.array([r[k] for r in rows]).T for k in keys}
