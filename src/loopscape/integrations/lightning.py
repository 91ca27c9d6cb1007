"""SHIFT from Lightning: :class:`ShiftCallback`, a ``lightning.pytorch.Callback``::

    trainer = L.Trainer(max_steps=5000, callbacks=[ShiftCallback(n_loops=3, at=1000)])

The LightningModule holds the model to loop (loopified, or with an
``n_loops`` attribute), anywhere among its submodules. Steps up to the switch
step run one loop, later ones ``n_loops``; with neither ``at`` nor
``milestones`` SCP decides after each validation, on ``monitor`` (the logged
validation loss) and the mean, over the optimiser steps since the last
validation, of each step's gradient norm before clipping (``step_mean`` in
:data:`~loopscape.shift.criterion.GRAD_NORMS`, as loopscape's algorithmic
trainer). It logs ``n_loops`` (and ``shift_step`` once decided; until then
SCP's progress, ``scp_grad_norm`` the last norm it read) through the module's
logger (TensorBoard by default), and saves its state with the checkpoint.
"""

from __future__ import annotations

import logging

import torch

from loopscape.extras import require_extra
from loopscape.landscape.probe import CurvatureProbe, probe_batches_to_device, scalars
from loopscape.reporting.curvature import plot_curves
from loopscape.shift.controller import STATE_KEY, ShiftController, get_n_loops, saved_state
from loopscape.shift.schedule import ShiftConfig

pl = require_extra("lightning.pytorch", "lightning")


log = logging.getLogger(__name__)


class ShiftCallback(pl.Callback):
    """SHIFT's schedule as a Lightning callback (arguments: :class:`~loopscape.shift.schedule.ShiftConfig`'s, plus
    ``monitor``). Its state: the controller's (``shift_state``) and the running sum of the step gradient norms since
    the last validation (``step_grad_norms``), whose mean SCP reads (``step_mean``)."""

    def __init__(self, n_loops: int = 2, *, monitor: str = "val_loss", **settings):
        self.config = ShiftConfig.of(n_loops, **settings)
        self.controller = ShiftController(self.config.build(), grad_norm="step_mean")
        self.monitor = monitor
        self._grad = {"sum": 0.0, "n": 0}  # step gradient norms since the last validation (before clipping)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.controller.attach(pl_module)
        if self.controller.schedule.criterion is not None:
            for cb in trainer.checkpoint_callbacks:
                # saved in on_train_batch_end, before that step's validation: a run resumed from such a
                # checkpoint never shows SCP the evaluation Lightning does not rerun, and switches later
                steps = getattr(cb, "_every_n_train_steps", 0) or 0
                if steps > 0 or getattr(cb, "_train_time_interval", None) is not None:
                    cadence = f"every_n_train_steps={steps}" if steps > 0 else "train_time_interval"
                    raise ValueError(
                        f"ShiftCallback with SCP cannot resume exactly from ModelCheckpoint({cadence}): Lightning "
                        "saves those before the step's validation and does not rerun it on resume; checkpoint after "
                        "validation instead (ModelCheckpoint() or every_n_epochs), or give at= for a fixed switch"
                    )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.controller.optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.controller.before_step(trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("n_loops", float(get_n_loops(pl_module)))
        if self.controller.schedule.shift_step is not None:
            pl_module.log("shift_step", float(self.controller.schedule.shift_step))
        for key, value in self.controller.scp_progress().items():
            pl_module.log(key, float(value))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().norm() for p in pl_module.parameters() if p.grad is not None]
        if grads:  # kept on the device: read once per validation, not synchronised every step
            self._grad["sum"] = self._grad["sum"] + torch.stack(grads).norm()
            self._grad["n"] += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get(self.monitor)
        schedule = self.controller.schedule
        if loss is None and schedule.criterion is not None and schedule.shift_step is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise ValueError(
                f"ShiftCallback(monitor={self.monitor!r}): SCP needs that validation metric, but the module logged "
                f"no {self.monitor!r} in validation (logged: {logged}); pass monitor= the name you self.log()"
            )
        grad = float(self._grad["sum"]) / self._grad["n"] if self._grad["n"] else None
        self._grad = {"sum": 0.0, "n": 0}
        self.controller.after_evaluation(trainer.global_step, None if loss is None else float(loss), grad)

    def on_train_end(self, trainer, pl_module) -> None:
        self.controller.report_end(trainer.global_step, trainer.is_global_zero)

    def state_dict(self) -> dict:
        grads = {"sum": float(self._grad["sum"]), "n": self._grad["n"]}
        return {STATE_KEY: self.controller.state_dict(), "step_grad_norms": grads}

    def load_state_dict(self, state_dict: dict) -> None:
        # checkpoints written before shift_state held the controller's keys beside "grad"
        self.controller.load_state_dict(saved_state(state_dict))
        self._grad = dict(state_dict.get("step_grad_norms", state_dict.get("grad")))


class CurvatureCallback(pl.Callback):
    """Curvature tracked during training (:class:`~loopscape.landscape.probe.CurvatureProbe`) on
    fixed ``probe_batches``, every ``every`` optimiser steps: logged through the module's logger
    (``curvature/lambda_1`` ..., ``curvature/trace``, ``curvature/matrix_entropy``,
    ``curvature/mutual_information``), written to ``folder/curvature.jsonl``, saved with the
    checkpoint, and plotted at the end. Measured on global rank 0. ``module``: the attribute of the
    LightningModule whose Hessian is taken (e.g. ``"model"`` for a wrapped HF model); the
    LightningModule itself if None."""

    def __init__(
        self, probe_batches, every: int = 500, k: int = 5, params=None, folder=None, module=None, **probe_options
    ):
        self.module = module
        self.probe = CurvatureProbe(probe_batches, every=every, k=k, params=params, folder=folder, **probe_options)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.probe.batches = probe_batches_to_device(self.probe.batches, pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        steps = trainer.estimated_stepping_batches
        if trainer.is_global_zero and 0 < steps < self.probe.every:
            log.warning(
                f"CurvatureCallback measures every {self.probe.every} steps and this run has {int(steps)}: "
                "nothing will be measured (lower every=)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        target = pl_module if self.module is None else getattr(pl_module, self.module)
        row = self.probe.maybe_measure(target, trainer.global_step)
        if row is not None:
            # straight to the loggers at the measured step: through pl_module.log the last value would be
            # logged again at every later logging step, as if it had been measured there
            values = scalars(row)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # for monitors

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.probe.rows and self.probe.folder is not None:
            plot_curves({"run": [self.probe.rows]}, self.probe.folder / "curvature.png")

    @property
    def state_key(self) -> str:
        """Where the checkpoint keeps this callback's state: the class and the settings that tell two of them
        in one trainer apart (Lightning's advice for stateful callbacks), so each resumes its own."""
        p = self.probe
        return self._generate_state_key(
            every=p.every,
            k=p.k,
            params=_describe_params(p.params),
            module=self.module,
            folder=None if p.folder is None else str(p.folder),
            n_probes=p.n_probes,
            n_steps=p.n_steps,
            n_bins=p.n_bins,
        )

    def state_dict(self) -> dict:
        return self.probe.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # a checkpoint from before state_key named the settings keeps the state under the class name alone
        # (one CurvatureCallback per trainer then): the one CurvatureCallback of this trainer takes it
        states, old = checkpoint.get("callbacks") or {}, type(self).__qualname__
        ours = [cb for cb in trainer.callbacks if isinstance(cb, CurvatureCallback)]
        if self.state_key not in states and old in states and ours == [self]:
            self.load_state_dict(states[old])


def _describe_params(params) -> str | None:
    """A stable text for ``params`` in a state key: a name pattern as it is; a module or a list of
    parameters by what it holds, never by its values (they change while training)."""
    if params is None or isinstance(params, str):
        return params
    if isinstance(params, torch.nn.Module):
        tensors = list(params.parameters())
    elif isinstance(params, (list, tuple)):
        tensors = list(params)
    else:  # an iterator: not read here, the probe reads it
        return type(params).__name__
    return f"{type(params).__name__} of {len(tensors)} tensors, shapes {[tuple(t.shape) for t in tensors]}"
