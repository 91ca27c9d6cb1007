"""Independent training jobs on worker processes, with one progress bar."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loopscape.io import hold_as_worker
from loopscape.training.run import units_done


def epoch_progress(run_dir: str | Path, resume: bool, progress_q) -> Callable[[int], None] | None:
    """An ``on_epoch`` callback that puts the epochs done since the last call on
    ``progress_q``, starting from the checkpoint a resumed run continues from."""
    if progress_q is None:
        return None
    last = [units_done(run_dir) if resume else 0]

    def on_epoch(epoch: int) -> None:
        progress_q.put(epoch - last[0])
        last[0] = epoch

    return on_epoch


_PROGRESS = None  # in a worker: the queue its jobs report progress on
_INIT_ERROR: Exception | None = None  # in a worker: why its initialiser failed


def _init_worker(parent: int, folder: str | None, progress) -> None:
    """Worker initialiser: take the progress queue, share the run folder's workers lock, and exit
    when the parent dies (a killed parent must not leave workers writing into a folder a resumed
    run writes). A failure is kept for the worker's first job to raise: raised here, it would
    only reach the parent as a worker that died abruptly, which reads like the system's killing."""
    global _PROGRESS, _INIT_ERROR
    _PROGRESS = progress
    try:
        if folder is not None:
            hold_as_worker(Path(folder))
    except Exception as err:
        _INIT_ERROR = err
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _call(fn: Callable, *job):
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    return fn(*job, _PROGRESS)


def run_jobs(
    fn: Callable,
    jobs: Sequence[tuple],
    units: Sequence[int],
    description: str,
    workers: int = 0,
    show_progress: bool = True,
    folder: Path | None = None,
) -> list:
    """``[fn(*job, progress_q) for job in jobs]``, on ``workers`` processes (0: one per core).

    ``fn`` is a top-level function; it reports progress by putting increments
    (e.g. epochs done) on ``progress_q`` (``None`` when run in this process).
    ``units`` is each job's total, for the bar. A worker's error is re-raised here.
    Workers exit if this process dies; with ``folder`` (the run folder they
    write into) they hold its workers lock while they live.
    """
    if not jobs:
        return []

    workers = workers or min(os.cpu_count() or 1, len(jobs))
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not show_progress) as bar:
        task_id = bar.add_task(description, total=sum(units))
        lines = _LinesOffTerminal(bar, task_id, show_progress)
        if workers == 1:
            results = []
            for job, n in zip(jobs, units):
                results.append(fn(*job, None))
                bar.update(task_id, advance=n)
                lines.maybe_print(force=True)
            return results
        ctx = mp.get_context("spawn")  # fork after torch's thread pools start can deadlock
        progress = ctx.Queue()  # handed to each worker when it starts: no manager process to outlive us
        init = (os.getpid(), None if folder is None else str(folder), progress)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
            futures = [pool.submit(_call, fn, *job) for job in jobs]
            while not all(f.done() for f in futures):
                time.sleep(0.2)
                while not progress.empty():
                    bar.update(task_id, advance=progress.get())
                lines.maybe_print()
            results = [f.result() for f in futures]
            bar.update(task_id, completed=sum(units))
            lines.maybe_print(force=True)
            return results


class _LinesOffTerminal:
    """Without a terminal (CI logs, nohup) a live bar shows only its final state: print a plain line of
    progress every ``LINE_EVERY_S`` seconds instead."""

    LINE_EVERY_S = 30.0

    def __init__(self, bar: Progress, task_id, show_progress: bool):
        self.bar, self.task_id = bar, task_id
        self.active = show_progress and not bar.console.is_terminal
        self.last = time.monotonic()

    def maybe_print(self, force: bool = False) -> None:
        if not self.active or not (force or time.monotonic() - self.last >= self.LINE_EVERY_S):
            return
        task = self.bar.tasks[self.task_id]
        share = task.completed / task.total if task.total else 1.0
        print(
            f"{task.description}: {task.completed:.0f}/{task.total:.0f} ({share:.0%}), "
            f"{time.strftime('%H:%M:%S', time.gmtime(task.elapsed or 0))} elapsed",
            flush=True,
        )
        self.last = time.monotonic()
