"""The run skeleton every trainer shares: resume, the metrics log, checkpoints, final weights.

A run folder holds ``metrics.jsonl`` (one row per evaluation, keyed by the
unit the trainer counts: ``epoch`` or ``step``), ``checkpoints/`` and, once the
run ends, ``model.safetensors``. :class:`RunState` is the bookkeeping around a
trainer's loop::

    run = RunState(run_dir, total=config.epochs, checkpoint_every=50, unit="epoch")
    extra = run.resume(model, optimizer, generator) if resume else {}
    with run.open_log() as log:
        for epoch in range(run.start + 1, run.total + 1):
            ...                                   # train, evaluate, log.append(row)
            if run.checkpoint_due(epoch):
                run.save(epoch, model, optimizer, generator, extra={...})
    rows = run.finish(model)

A resumed run continues after its latest checkpoint; rows logged after that
checkpoint are dropped and redone, so it ends with the numbers of an
uninterrupted run. Only the writing process (rank 0 under DDP) passes
``write=True``; every process resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from loopscape.errors import DamagedRunError, DivergenceError
from loopscape.io import REPAIR, JsonlLog, check_digest, file_digest, read_json_file, read_jsonl, write_json
from loopscape.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights


def check_finite(values: dict[str, float], where: str, hint: str) -> None:
    """Raise :class:`DivergenceError` naming ``where`` (run and step) and the likely setting
    ``hint`` if any of ``values`` (loss, gradient norm, ...) is NaN or infinite."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        found = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise DivergenceError(f"training diverged: {where}: {found}; the likely setting is {hint}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def units_done(run_dir: str | Path) -> int:
    """How many units (epochs or steps) the run folder's latest checkpoint holds; 0 if none."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    return read_json_file(pointer)["done"] if pointer.exists() else 0


def log_records(run_dir: Path) -> dict[str, dict]:
    """Every JSON-lines log of a run folder (metrics, tracked spectra): its rows, size and SHA-256 now."""
    return {p.name: {"rows": len(read_jsonl(p)), **file_digest(p)} for p in sorted(Path(run_dir).glob("*.jsonl"))}


def check_logs(
    run_dir: Path, recorded: dict[str, dict], when: str, unit: str = "epoch", upto: int | None = None
) -> None:
    """Each log must begin with exactly what ``when`` recorded (rows, then bytes and hash; on resume
    a log may go on past that, with rows after ``upto`` that are cut and redone), else it was damaged."""
    for name, rec in recorded.items():
        path = Path(run_dir) / name
        rows = read_jsonl(path)
        if upto is not None:
            rows = [r for r in rows if r.get(unit, r.get("epoch", 0)) <= upto]
        if len(rows) != rec["rows"]:
            raise DamagedRunError(f"{path} holds {len(rows)} rows where {when} recorded {rec['rows']}; {REPAIR}")
        data = path.read_bytes()[: rec["size"]]
        if len(data) != rec["size"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise DamagedRunError(f"{path} is not what {when} recorded (its bytes differ); {REPAIR}")


def verify_finished(run_dir: str | Path) -> None:
    """A finished run's logs and final weights are what it wrote (``final.json``), else refused in one line."""
    run_dir = Path(run_dir)
    final = read_json_file(run_dir / "final.json")
    check_logs(run_dir, final["logs"], "the finished run")
    check_digest(run_dir / "model.safetensors", final["model"])


class RunState:
    """Resume point, metrics log, checkpoint cadence and final weights of one run folder."""

    def __init__(
        self,
        run_dir: str | Path,
        total: int,
        checkpoint_every: int,
        unit: str,
        write: bool = True,
        tensorboard: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.total, self.checkpoint_every, self.unit, self.write = total, checkpoint_every, unit, write
        self.tensorboard = tensorboard  # mirror the metrics rows as TensorBoard scalars in run_dir/tensorboard
        self.start = 0  # units done before this process started

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None
    ) -> dict:
        """Restore the latest checkpoint into ``model``, ``optimizer`` and ``generator``,
        if there is one; returns its extras (``{}`` if none)."""
        ckpt = latest_checkpoint(self.checkpoints)
        if ckpt is None:
            return {}
        state = load_checkpoint(ckpt, model, optimizer, generator)
        self.start = state["done"]
        extra = dict(state["extra"])
        when = f"the checkpoint at {self.unit} {self.start}"
        check_logs(self.run_dir, extra.pop("logs", {}), when, unit=self.unit, upto=self.start)
        return extra

    def open_log(self) -> JsonlLog | _NoLog:
        """``metrics.jsonl`` for appending, cut back to the resume point (emptied on a fresh start);
        with ``tensorboard``, each row is also written as scalars (``metrics.jsonl`` stays the source of truth)."""
        if not self.write:
            return _NoLog()
        start, unit = self.start, self.unit
        log = JsonlLog(self.run_dir / "metrics.jsonl", keep=lambda r: start > 0 and r[unit] <= start)
        return TensorBoardLog(log, self.run_dir / "tensorboard", unit, start) if self.tensorboard else log

    def checkpoint_due(self, done: int) -> bool:
        return done % self.checkpoint_every == 0 or done == self.total

    def save(
        self,
        done: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None = None,
        extra: dict | None = None,
    ) -> None:
        if self.write:
            extra = {**(extra or {}), "logs": log_records(self.run_dir)}
            save_checkpoint(self.checkpoints, done, model, optimizer, generator, extra=extra, unit=self.unit)

    def fail(self, error: Exception) -> None:
        """Mark the run failed (``failed.json`` with the reason): nothing downstream may judge it."""
        if self.write:
            write_json(self.run_dir / "failed.json", {"error": str(error)})

    def finish(self, model: nn.Module, metadata: dict[str, str] | None = None) -> list[dict]:
        """Write the final weights; returns every metrics row (``[]`` where this process does not write)."""
        if not self.write:
            return []
        save_weights(self.run_dir / "model.safetensors", model, metadata=metadata)
        (self.run_dir / "failed.json").unlink(missing_ok=True)  # an earlier session's failure is resumed past
        final = {"logs": log_records(self.run_dir), "model": file_digest(self.run_dir / "model.safetensors")}
        write_json(self.run_dir / "final.json", final)
        return read_jsonl(self.run_dir / "metrics.jsonl")


class TensorBoardLog:
    """A metrics log that also writes every numeric value of a row as a TensorBoard scalar at the
    row's ``unit`` (a list, one value per population member, as ``key/member<k>``). On resume
    the events past the resume point are purged, as ``metrics.jsonl`` is cut back."""

    def __init__(self, log: JsonlLog, folder: Path, unit: str, start: int):
        from loopscape.extras import require_extra

        tensorboard = require_extra("torch.utils.tensorboard", "tensorboard")
        self.log, self.unit = log, unit
        self.writer = tensorboard.SummaryWriter(str(folder), purge_step=start + 1 if start else None)

    def append(self, row: dict) -> None:
        self.log.append(row)
        step = row[self.unit]
        for key, value in row.items():
            if key == self.unit:
                continue
            named = (
                [(f"{key}/member{k}", v) for k, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            )
            for name, v in named:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(name, v, step)
        self.writer.flush()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()
        self.log.close()


class _NoLog:
    """The metrics log of a process that does not write (a non-zero rank)."""

    def append(self, row: dict) -> None:
        pass

    def __enter__(self) -> _NoLog:
        return self

    def __exit__(self, *exc) -> None:
        pass
