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


def test_resuming_a_seeds_folder_in_use_is_refused_before_touching_it(tmp_path):
    """`algorithmic --seeds ... --resume` takes the seeds folder's lock (seeds.json, report.html live there), not
    only each seed's: a second resume while the first holds it is refused in one line, and writes nothing."""
    out = tmp_path / "seeds"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        args = ["-m", "loopscape.cli", "algorithmic", "-p", "single", "-o", str(out), "--seeds", "0,1", "--resume"]
        r = subprocess.run([sys.executable, *args, "--steps", "2", "-q"], capture_output=True, text=True)
        assert (r.returncode, r.stderr.strip()) == (
            2,
            f"error: run folder '{out}' is in use by another loopscape process (PID {holder.pid}); "
            "wait for it to finish or stop it",
        )
        assert sorted(p.name for p in out.iterdir()) == before == [".lock", ".workers.lock"]
    finally:
        holder.kill()
        holder.wait()


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


# -- damaged run folders: each torn or corrupted file is refused in one line naming it ---------------

from typer.testing import CliRunner  # noqa: E402

from loopscape.cli import app  # noqa: E402

TINY = ["--epochs", "3", "--seeds", "0", "--set", "data.n_train=100", "--set", "data.n_val=50", "--set", "workers=1"]
RUN = Path("runs/looped_attn/seed0")


def tear(path: Path) -> None:
    """Cut a file in the middle of its last line (a crash mid-write)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def alter_digit(path: Path) -> None:
    """Change one digit in the second half of a text file: it still parses, but says something else."""
    text = path.read_text()
    i = next(i for i in range(len(text) // 2, len(text)) if text[i] in "123456789")
    path.write_text(text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1 :])


def flip(path: Path) -> None:
    """Change one byte in the middle of a file (a corrupted disk block)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["markov", "-o", str(out), *TINY, "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize(
    "damage, file, says",
    [
        (tear, RUN / "metrics.jsonl", "holds 3 rows where the finished run recorded 4"),
        (tear, RUN / "spectra.jsonl", "holds 3 rows where the finished run recorded 4"),
        (alter_digit, RUN / "metrics.jsonl", "is not what the finished run recorded (its bytes differ)"),
        (alter_digit, RUN / "spectra.jsonl", "is not what the finished run recorded (its bytes differ)"),
        (flip, RUN / "model.safetensors", "is not the file that was written (size or hash differ)"),
        (tear, RUN / "final.json", "is damaged (not JSON)"),
        (lambda p: p.unlink(), RUN / "final.json", "is missing"),
        (tear, Path("config.yaml"), "is damaged (not YAML)"),
    ],
)
def test_a_damaged_finished_run_is_refused_naming_the_file(finished, damage, file, says):
    before = (finished / "summary.json").read_bytes()
    damage(finished / file)
    r = CliRunner().invoke(app, ["markov", "-o", str(finished), "--resume", *TINY, "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (
        f"error: {finished / file} {says}; restore it, or delete the run folder it belongs to and run "
        "(or --resume) again"
    )
    assert (finished / "summary.json").read_bytes() == before  # nothing judged from the damaged run


def test_a_damaged_line_inside_a_log_is_refused(finished):
    path = finished / RUN / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["markov", "-o", str(finished), "--resume", *TINY, "-q"])
    assert r.exit_code == 2 and f"{path}: line 2 is damaged (not JSON)" in r.output


def test_a_damaged_checkpoint_is_refused_and_a_torn_tail_past_it_is_redone(tmp_path):
    from loopscape.data.markov import MarkovDataConfig, build_task
    from loopscape.errors import DamagedRunError
    from loopscape.models.linear_attn import single_attn
    from loopscape.training.markov import MarkovTrainConfig, train_markov
    from loopscape.training.run import seeded

    task = build_task(MarkovDataConfig(n_train=100, n_val=50))[1]
    config = MarkovTrainConfig(epochs=6, batch_size=16, checkpoint_every=3)

    def fresh():
        with seeded(0):
            return single_attn(max_len=3)

    def crash_at_5(epoch):
        if epoch == 5:
            raise KeyboardInterrupt

    full = train_markov(fresh(), task, config, tmp_path / "full", seed=0)
    for name in ("state.json", "optimizer.safetensors", "model.safetensors"):
        run = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            train_markov(fresh(), task, config, run, seed=0, on_epoch=crash_at_5)
        ckpt = run / "checkpoints" / "epoch-00003" / name
        (tear if name.endswith(".json") else flip)(ckpt)
        with pytest.raises(DamagedRunError, match=str(ckpt)):
            train_markov(fresh(), task, config, run, seed=0, resume=True)
    run = tmp_path / "torn-tail"
    with pytest.raises(KeyboardInterrupt):
        train_markov(fresh(), task, config, run, seed=0, on_epoch=crash_at_5)
    tear(run / "metrics.jsonl")  # epoch 5's row, past the checkpoint at 3: redone exactly
    resumed = train_markov(fresh(), task, config, run, seed=0, resume=True)
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in full
    ]


def test_a_finished_algorithmic_run_with_a_torn_log_is_refused_not_reported_from_an_earlier_step(tmp_path):
    out = tmp_path / "algo"
    args = ["algorithmic", "-p", "single", "--steps", "12", "--set", "model.d_model=16", "--set", "train.eval_every=4"]
    args += ["--set", "train.checkpoint_every=100", "--set", "test_lengths=[1,2,3]", "-q"]
    assert CliRunner().invoke(app, [*args, "-o", str(out)]).exit_code == 0
    tear(out / "single" / "metrics.jsonl")
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--resume"])
    assert r.exit_code == 2 and r.output.strip().startswith(
        f"error: {out / 'single' / 'metrics.jsonl'} holds 2 rows where the checkpoint at step 12 recorded 3"
    )


def test_a_shift_run_that_never_switched_is_scored_as_single_attn(tmp_path):
    out = tmp_path / "algo"
    args = [
        "algorithmic",
        "-p",
        "looped,shift",
        "--steps",
        "8",
        "--set",
        "model.d_model=16",
        "--set",
        "train.eval_every=4",
    ]
    args += [
        "--set",
        "train.scp.patience=50",
        "--set",
        "train.scp.wait=50",
        "--set",
        "train.scp.max_wait=60",
        "--set",
        "test_lengths=[1,2,12]",
        "-q",
    ]
    r = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    shift = json.loads((out / "results.json").read_text())["paradigms"]["shift"]
    assert shift["scored_as"] == "single" and set(shift["length_accuracy"]) == {"single"}
    page = (out / "report.html").read_text()
    assert "scored as Single-Attn (one step)" in page and "not tested" in page


@pytest.mark.parametrize(
    "command",
    [
        ["markov", "--epochs", "30", "--seeds", "0", "--set", "workers=1", "--set", "hessian.enabled=false"],
        ["algorithmic", "-p", "looped", "--steps", "60", "--set", "model.d_model=16", "--set", "train.eval_every=5"],
    ],
    ids=["markov", "algorithmic"],
)
@pytest.mark.slow
def test_killing_a_single_process_run_resumes_bit_for_bit(tmp_path, command):
    """SIGKILL the one process right after its first checkpoint; --resume ends with every number of an
    uninterrupted run (wall times aside)."""
    every = ["--set", "train.checkpoint_every=10", "-q"]
    cmd = [sys.executable, "-m", "loopscape.cli", *command, *every]
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "-o", str(run)])
    deadline = time.monotonic() + 60
    while not list(run.rglob("checkpoints/latest.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(run.rglob("final.json")), "killed too late: the run had finished"
    assert subprocess.run([*cmd, "-o", str(run), "--resume"]).returncode == 0
    assert subprocess.run([*cmd, "-o", str(tmp_path / "whole")]).returncode == 0

    def numbers(path):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("time_s",)}
            for line in path.read_text().splitlines()
        ]

    logs = sorted(run.rglob("metrics.jsonl"))
    assert logs
    for f in logs:
        assert numbers(f) == numbers(tmp_path / "whole" / f.relative_to(run)), f


def test_a_worker_that_cannot_take_the_run_folder_says_why_not_that_it_died(tmp_path):
    # the workers lock cannot be created in a folder that is gone: the parent gets the worker's own
    # error (which the CLI prints as one line naming the file), not a pool broken "abruptly"
    from loopscape.experiments.parallel import run_jobs

    gone = tmp_path / "gone"
    with pytest.raises(FileNotFoundError) as err:
        run_jobs(print, [(0,), (1,)], [1, 1], "jobs", workers=2, show_progress=False, folder=gone)
    assert err.value.filename == str(gone / ".workers.lock")


def test_a_damaged_done_marker_is_repaired_from_the_verified_run_or_refused(tmp_path):
    """A finished run whose done.json is torn resumed with exit 0 and left the torn file in place."""
    from typer.testing import CliRunner

    from loopscape.cli import app

    out = tmp_path / "run"
    args = ["markov", "-o", str(out), "--epochs", "2", "--seeds", "0", "-q", "--set", "hessian.enabled=false"]
    assert CliRunner().invoke(app, args).exit_code == 0
    done = out / "runs" / "looped_attn" / "seed0" / "done.json"
    done.write_text('{"epo')  # torn
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads(done.read_text()) == {"epochs": 2}  # repaired: the run itself was verified
    done.write_text('{"epo')
    weights = done.parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # and the run it marks is damaged too
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "model.safetensors" in r.output, r.output
