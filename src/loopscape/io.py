"""Crash-safe files and run folders: atomic writes, append-only JSON-lines logs,
and the one rule for reusing a folder.

Every result file is written to a temporary sibling and moved into place with
``os.replace`` (atomic on POSIX and Windows), so a crash leaves either the old
file or the new one, never half of one. Metric logs are appended one line at a
time and flushed, so a killed run keeps every epoch it finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from loopscape.config import ConfigError, from_dict, to_dict
from loopscape.errors import DamagedRunError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then move it into place; the file's mode
    follows the umask as a plain ``open`` would (``mkstemp`` alone makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a crash mid-write) is dropped, a damaged line
    before it is refused (:class:`~loopscape.errors.DamagedRunError`)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DamagedRunError(f"{path}: line {i + 1} is damaged (not JSON); {REPAIR}") from None
    return rows


REPAIR = "restore it, or delete the run folder it belongs to and run (or --resume) again"


def read_json_file(path: str | Path) -> Any:
    """A JSON file of a run folder; a torn or missing one is refused with one line naming it."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise DamagedRunError(f"{path} is missing; {REPAIR}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedRunError(f"{path} is damaged (not JSON); {REPAIR}") from None


def file_digest(path: str | Path) -> dict:
    """Size and SHA-256 of a file, recorded when it is written and checked when it is read back."""
    data = Path(path).read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_digest(path: str | Path, recorded: dict) -> None:
    """Refuse a file that is missing or differs from what was written."""
    path = Path(path)
    if not path.exists():
        raise DamagedRunError(f"{path} is missing; {REPAIR}")
    if file_digest(path) != recorded:
        raise DamagedRunError(f"{path} is not the file that was written (size or hash differ); {REPAIR}")


def rewrite_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class JsonlLog:
    """Append-only metrics log: one JSON object per line, flushed as written."""

    def __init__(self, path: str | Path, keep: Callable[[dict], bool] | None = None):
        """Open ``path`` for appending; with ``keep``, first drop the rows it rejects
        (used on resume to forget epochs past the checkpoint)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep is not None:
            rewrite_jsonl(self.path, [r for r in read_jsonl(self.path) if keep(r)])
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOCK, WORKERS_LOCK = ".lock", ".workers.lock"
_HELD: dict[Path, int] = {}  # run folders this process holds: resolved path -> the lock file's descriptor


def lock_run_folder(out: Path, wait_for_workers: float = 10.0) -> None:
    """Make this process the one writer of run folder ``out`` until it exits (re-entrant).

    ``out/.lock`` is held with an exclusive ``flock`` and names the holder's PID;
    a second process is refused with one line naming it. Worker processes hold
    ``out/.workers.lock`` shared (:func:`hold_as_worker`): a new writer waits up
    to ``wait_for_workers`` seconds for workers of an earlier, killed writer to
    exit (they watch their parent), and is refused if they do not.
    """
    key = out.resolve()
    if key in _HELD:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {str(out)!r} is a file, not a folder; choose another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ConfigError(
            f"output folder {str(out)!r} cannot be written ({err.strerror}); choose another --output"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"run folder {str(out)!r} is in use by another loopscape process (PID {holder}); "
            "wait for it to finish or stop it"
        ) from None
    workers = os.open(out / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait_for_workers
        while True:
            try:
                fcntl.flock(workers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(
                        f"run folder {str(out)!r}: worker processes of an earlier run are still writing into it; "
                        "stop them (see .workers.lock) and try again"
                    ) from None
                time.sleep(0.2)
        fcntl.flock(workers, fcntl.LOCK_UN)
    finally:
        os.close(workers)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def hold_as_worker(out: Path) -> None:
    """In a worker process: share ``out/.workers.lock`` for the worker's life, so that no new
    writer takes the folder while it still writes (see :func:`lock_run_folder`)."""
    fd = os.open(out / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[(out / WORKERS_LOCK).resolve()] = fd


def read_run_config(path: Path) -> Any:
    """A run folder's ``config.yaml``; a damaged one is refused with one line naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DamagedRunError(f"{path} is damaged (not YAML); {REPAIR}") from None


def refuse_to_overwrite(out: Path, resumable: bool = True) -> None:
    """A run never writes into a non-empty folder unless it resumes it (``resumable``: the command can).
    The lock files do not count."""
    if out.is_dir() and any(p.name not in (LOCK, WORKERS_LOCK) for p in out.iterdir()):
        hint = "pass --resume to continue it or choose another --output" if resumable else "choose another --output"
        raise ConfigError(f"output folder {str(out)!r} already exists and is not empty; {hint}")


def claim_new_run_folder(out: Path, resumable: bool = True) -> None:
    """Refuse a non-empty ``out`` before touching it (a refused folder is left exactly as it was), then
    become its one writer (:func:`lock_run_folder`) and check again: another writer may have come first."""
    refuse_to_overwrite(out, resumable)
    lock_run_folder(out)
    refuse_to_overwrite(out, resumable)


def same_config(path: Path, config: Any) -> bool:
    """Whether run folder file ``path`` (a ``config.yaml``) holds ``config``. Settings added to loopscape
    since the folder was written take their defaults, so an older folder with the same settings resumes."""
    saved = read_run_config(path)
    if saved == to_dict(config):
        return True
    try:
        return isinstance(saved, dict) and to_dict(from_dict(type(config), saved)) == to_dict(config)
    except ConfigError:  # a setting that no longer exists, or a value no longer allowed
        return False


def prepare_run_folder(out: Path, config: Any, resume: bool) -> None:
    """Create ``out`` with the run's ``config.yaml`` (any config dataclass), as its one writer
    (:func:`lock_run_folder`); refuse to touch an existing folder unless resuming it with the same config."""
    saved = out / "config.yaml"
    if resume:
        if not saved.exists():
            raise ConfigError(f"--resume needs an existing run folder with config.yaml (none in {str(out)!r})")
        lock_run_folder(out)
        if not same_config(saved, config):
            raise ConfigError(
                f"--resume: the configuration differs from the one in {str(saved)!r}; resume with the same settings"
            )
        return
    claim_new_run_folder(out)
    atomic_write_text(saved, yaml.safe_dump(to_dict(config), sort_keys=False))
