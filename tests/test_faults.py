"""Faults for real: processes killed with SIGKILL, a second writer on the same run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopscape.config import ConfigError
from loopscape.io import lock_run_folder

HOLD = """
import sys, time
from pathlib import Path
from loopscape.io import lock_run_folder
lock_run_folder(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its dead parent's reaper) is not running
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "Z"
    return state != "Z"


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another loopscape process \(PID {holder.pid}\)"):
            lock_run_folder(tmp_path / "run")
        holder.kill()
        holder.wait()
        lock_run_folder(tmp_path / "run")  # the kernel released the dead holder's lock
    finally:
        holder.kill()


def test_cli_refuses_a_folder_in_use(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["-m", "loopscape.cli", "markov", "-o", str(tmp_path / "run"), "--epochs", "2", "--seeds", "0", "-q"]
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.strip() == (
            f"error: run folder '{tmp_path / 'run'}' is in use by another loopscape process (PID {holder.pid}); "
            "wait for it to finish or stop it"
        )
    finally:
        holder.kill()


@pytest.mark.slow
def test_killing_the_parent_stops_its_workers_and_the_run_resumes_bit_for_bit(tmp_path):
    run = tmp_path / "run"
    args = [
        "--seeds",
        "0,1",
        "--set",
        "workers=2",
        "--set",
        "hessian.enabled=false",
        "--set",
        "train.checkpoint_every=20",
    ]
    cmd = [sys.executable, "-m", "loopscape.cli", "markov", "--epochs", "400", *args, "-q"]
    parent = subprocess.Popen([*cmd, "-o", str(run)])
    deadline = time.monotonic() + 60
    while not list(run.glob("runs/*/seed*/checkpoints/latest.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [p for p in children(parent.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers, "the run should train on worker processes"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers), "workers outlived their parent"
    assert subprocess.run([*cmd, "-o", str(run), "--resume"]).returncode == 0
    assert subprocess.run([*cmd, "-o", str(tmp_path / "whole")]).returncode == 0

    def strip(text):
        return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in text.splitlines()]

    for f in sorted(run.glob("runs/*/seed*/metrics.jsonl")):
        other = tmp_path / "whole" / f.relative_to(run)
        assert strip(f.read_text()) == strip(other.read_text()), f
