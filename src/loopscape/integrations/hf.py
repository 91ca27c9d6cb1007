"""SHIFT from the Hugging Face Trainer: :class:`ShiftCallback`, a ``TrainerCallback``
configured like HF's own callbacks (``EarlyStoppingCallback``)::

    model = loopify(AutoModelForCausalLM.from_pretrained(path), layers=(4, 8), n_loops=1)
    trainer = Trainer(model, args, ..., callbacks=[ShiftCallback(n_loops=3, at=1000)])

Training steps up to the switch step run one loop, later ones ``n_loops``
(the convention of :class:`~loopscape.shift.schedule.ShiftSchedule`). With
neither ``at`` nor ``milestones``, SCP decides on each evaluation, on
``eval_loss`` and the last ``grad_norm`` the Trainer logged before it (one
step's gradient norm before clipping: ``last_logged`` in
:data:`~loopscape.shift.criterion.GRAD_NORMS`, not the full-batch norm of
loopscape's Markov trainer nor a mean over steps; log every step,
``logging_steps=1``, for the norm of the step evaluated). Every log row gains
``n_loops``, ``shift_step`` once the switch is decided, and until then SCP's
progress (``scp_evaluations``, ``scp_since_best``, ``scp_plateau_at``,
``scp_grad_norm``: the last norm it read). The callback's state
(``shift_state``, naming its norm) is saved in each checkpoint's
``trainer_state.json`` and read back on resume, so a run resumed across the
switch is the same run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from loopscape.extras import require_extra
from loopscape.io import read_json_file
from loopscape.landscape.probe import CurvatureProbe, probe_batches_to_device, scalars
from loopscape.reporting.curvature import plot_curves
from loopscape.shift.controller import STATE_KEY, ShiftController, get_n_loops
from loopscape.shift.schedule import ShiftConfig

transformers = require_extra("transformers", "hf")


def _saved_attribute(callback, state, attribute: str):
    """A stateful callback's saved ``attribute`` on resume: set on it by the Trainer when it restores callbacks,
    else read from the ``trainer_state.json`` the Trainer resumed from (it reads that file either way). Also adds
    the callback's entry to ``state.stateful_callbacks`` when the checkpoint had none (written by an earlier
    version or without this callback): the Trainer's next save expects one."""
    value = getattr(callback, attribute)
    stored = state.stateful_callbacks.get(type(callback).__name__)
    if value is None and isinstance(stored, dict):
        value = stored.get("attributes", {}).get(attribute)
    state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
    return value


logger = logging.getLogger(__name__)


class ShiftCallback(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """SHIFT's schedule as a ``TrainerCallback`` (arguments: :class:`~loopscape.shift.schedule.ShiftConfig`'s).

    ``optimizer``: ``"keep"`` the optimiser's state at the switch, or ``"reset"`` it.
    """

    def __init__(self, n_loops: int = 2, **settings):
        # its fields are the callback's args, saved with its state (ExportableState)
        self.config = ShiftConfig.of(n_loops, **settings)
        self.settings = asdict(self.config)
        self.controller = ShiftController(self.config.build(), grad_norm="last_logged")
        self.shift_state: dict | None = None  # restored by the Trainer (restore_callback_states_from_checkpoint)
        self._grad_norm: float | None = None  # the last logged grad_norm: what SCP reads (last_logged)
        self._writer = None  # TensorBoard, when the Trainer reports to it

    def state(self) -> dict:
        return {"args": self.settings, "attributes": {STATE_KEY: self.controller.state_dict()}}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        if self.controller.schedule.criterion is not None and strategy == "no":
            raise ValueError(
                "ShiftCallback with SCP decides on evaluations, but TrainingArguments(eval_strategy='no') never "
                "evaluates: set eval_strategy='steps' with eval_steps (and an eval_dataset), or give at= for a "
                "fixed switch step"
            )
        self.controller.attach(model, optimizer)
        restored = _saved_attribute(self, state, STATE_KEY)
        if restored is not None:
            self.controller.load_state_dict(restored)
        self.controller.before_step(state.global_step + 1)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.controller.optimizer = optimizer
        self.controller.before_step(state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if logs.get("grad_norm") is not None:
            self._grad_norm = float(logs["grad_norm"])
        ours = {"n_loops": get_n_loops(self.controller.model)}
        if self.controller.schedule.shift_step is not None:
            ours["shift_step"] = self.controller.schedule.shift_step
        ours.update(self.controller.scp_progress())
        logs.update(ours)  # for the loggers after this callback (printer, progress bar)
        if state.log_history:  # the Trainer appended its copy of this row before calling the callbacks
            state.log_history[-1].update(ours)
        if "tensorboard" in (args.report_to or []) and state.is_world_process_zero:
            # HF's TensorBoard callback ran before this one: write ours beside its events
            if self._writer is None:
                tensorboard = require_extra("torch.utils.tensorboard", "tensorboard")
                folder = getattr(args, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
                self._writer = tensorboard.SummaryWriter(folder or os.path.join(args.output_dir, "runs", "loopscape"))
            for key, value in ours.items():
                self._writer.add_scalar(f"loopscape/{key}", value, state.global_step)
            self._writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.controller.report_end(state.global_step, state.is_world_process_zero)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        self.controller.after_evaluation(state.global_step, loss, self._grad_norm)


class CurvatureCallback(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """Curvature tracked during training (:class:`~loopscape.landscape.probe.CurvatureProbe`):
    every ``every`` steps the top-``k`` eigenvalues, trace, density, Matrix Entropy and MI of the
    Hessian on ``probe_batches`` (dict batches with ``labels``, kept fixed), written to
    ``<output_dir>/curvature/curvature.jsonl`` (TensorBoard too when the Trainer reports to it),
    added to ``trainer.state.log_history``, and plotted at the end (``curvature.png``).

    Its state (every row, the last pseudo-spectrum) lives in each checkpoint's ``trainer_state.json``,
    written by the Trainer with the checkpoint itself: complete whenever the checkpoint is, and read
    back from the checkpoint a run resumes from, whatever its ``output_dir`` (the rows are written
    again into the new folder). The probe batches are not JSON: ``restore_callback_states_from_checkpoint``
    cannot rebuild this callback, so pass it again, as for any callback that holds data."""

    def __init__(self, probe_batches=None, every: int = 500, k: int = 5, params=None, **probe_options):
        # None only when HF rebuilds the callback from its saved arguments (which cannot hold tensors)
        batches = None if probe_batches is None else list(probe_batches)
        self.settings = {"batches": batches, "every": every, "k": k, "params": params, **probe_options}
        self.probe = None
        self.probe_state: dict | None = None  # restored by the Trainer (restore_callback_states_from_checkpoint)

    def state(self) -> dict:
        args = {
            k: v for k, v in self.settings.items() if k != "batches" and isinstance(v, (int, float, str, type(None)))
        }
        return {"args": args, "attributes": {"probe_state": None if self.probe is None else self.probe.state_dict()}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.settings["batches"] is None:
            raise ValueError(
                "CurvatureCallback needs probe_batches; TrainingArguments(restore_callback_states_from_checkpoint="
                "True) rebuilds callbacks from saved arguments, which cannot hold batches: leave it off (the callback "
                "restores its own state from the checkpoint)"
            )
        device = next(model.parameters()).device
        # TensorBoard: beside the Trainer's own run (its logging_dir where the Trainer has one; else a run
        # "curvature" under output_dir/runs, the Trainer's default parent), so one --logdir shows both
        board = "tensorboard" in (args.report_to or []) and (
            getattr(args, "logging_dir", None)
            or os.getenv("TENSORBOARD_LOGGING_DIR")
            or os.path.join(args.output_dir, "runs", "curvature")
        )
        self.probe = CurvatureProbe(
            **{**self.settings, "batches": probe_batches_to_device(self.settings["batches"], device)},
            folder=os.path.join(args.output_dir, "curvature") if state.is_world_process_zero else None,
            tensorboard=board or False,
        )
        if state.is_world_process_zero and 0 < state.max_steps < self.probe.every:
            logger.warning(
                f"CurvatureCallback measures every {self.probe.every} steps and this run has {state.max_steps}: "
                "nothing will be measured (lower every=)"
            )
        restored = _saved_attribute(self, state, "probe_state")
        if restored is None and state.global_step > 0:  # a checkpoint written before the state moved there
            older = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "curvature_probe.json")
            restored = read_json_file(older) if os.path.exists(older) else None
        if restored is not None and state.global_step > 0:
            self.probe.load_state_dict(restored)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        row = self.probe.maybe_measure(model, state.global_step)
        if row is not None:
            logs = {**scalars(row), "step": state.global_step}
            state.log_history.append(logs)
            if state.is_world_process_zero:
                print({k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()})  # as HF prints logs

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.probe.rows:
            plot_curves({"run": [self.probe.rows]}, Path(args.output_dir) / "curvature" / "curvature.png")
