"""The CLI's one error policy (issue 35), command by command: bad input (a ConfigError or any ValueError) is one
line on standard error and exit code 2, a run that failed one line and exit code 1, a bug a traceback; a flag and a
``--set`` that give one setting different values are refused in one line naming both."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from loopscape import cli
from loopscape.cli import app
from loopscape.errors import DivergenceError

runner = CliRunner()

COMMANDS = [
    "reproduce",
    "markov",
    "languages",
    "length-readings",
    "retrofit",
    "loop-sweep",
    "lm-eval",
    "sweep",
    "theory",
    "algorithmic",
]


def one_line(r) -> str:
    """The one line a refused command printed (asserting there is exactly one, and no traceback)."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_the_docstring_lists_every_command_one_line_each():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert sorted(names) == sorted(COMMANDS)
    listed = [line.split("``")[1] for line in cli.__doc__.splitlines() if line.startswith("- ``")]
    assert listed == COMMANDS


def test_every_command_is_registered_through_the_one_helper():
    for c in app.registered_commands:
        run = c.callback  # functools.wraps gives it the command's name; its code is the helper's
        assert run.__code__.co_qualname == "command.<locals>.register.<locals>.run" and run.__wrapped__, c.name


# (command and its arguments, the one line after "error: ", the field it names); "OUT" is a fresh folder
BAD_INPUT = [
    (["reproduce", "--set", "scale=medium"], "scale must be one of ('full', 'quick') (got 'medium')", "scale"),
    (["markov", "--set", "train.lr=-1"], "train.lr must be a number > 0 (got -1.0)", "train.lr"),
    (
        ["languages", "--set", "n_feasibility=0"],
        "n_feasibility must be an integer >= 1 (got 0)",
        "n_feasibility",
    ),
    (
        ["length-readings", "--set", "train.epochs=abc"],
        "train.epochs must be an integer (got 'abc')",
        "train.epochs",
    ),
    (["retrofit", "--set", "seeds=[]"], "seeds must be a non-empty list of integers (got [])", "seeds"),
    (
        ["loop-sweep", "--model", "OUT", "--loops", "x"],
        "--loops must be comma-separated integers or ranges like 1-16 (got 'x')",
        "--loops",
    ),
    (["sweep", "--set", "train.epochs=1.5"], "train.epochs must be an integer (got 1.5)", "train.epochs"),
    (["theory", "--set", "instances=0"], "instances must be an integer >= 1 (got 0)", "instances"),
    (
        ["algorithmic", "--set", "train.precision=fp8"],
        "train.precision must be one of ('fp32', 'bf16') (got 'fp8')",
        "train.precision",
    ),
]


@pytest.mark.parametrize("args, message, field", BAD_INPUT, ids=[a[0] for a, _, _ in BAD_INPUT])
def test_every_command_refuses_a_bad_setting_in_one_line_with_exit_2(tmp_path, args, message, field):
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in args]
    r = runner.invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert one_line(r) == f"error: {message}" and field in message
    assert not (out / "config.yaml").exists()


def test_lm_eval_refuses_a_bad_setting_in_one_line_with_exit_2(tmp_path):
    """lm-eval's own ValueError (it was a traceback); run as a process: lm-eval sets up its own logging."""
    cmd = [sys.executable, "-m", "loopscape.cli", "lm-eval", "--model", "loopscape", "--tasks", "x", "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == "error: Specify --output_path if providing --log_samples or --predict_only"
    assert done.stdout == ""


# each command, and the library function it hands its work to
STUDIES = [
    (["reproduce"], "loopscape.experiments.reproduce", "run_reproduce"),
    (["markov"], "loopscape.experiments.markov", "run_markov_study"),
    (["languages"], "loopscape.experiments.languages", "run_languages"),
    (["length-readings"], "loopscape.experiments.length", "run_length_readings"),
    (["retrofit"], "loopscape.experiments.retrofit", "run_retrofit"),
    (["loop-sweep", "--model", "OUT"], "loopscape.experiments.loop_sweep", "run_loop_sweep"),
    (["lm-eval", "--model", "loopscape"], "loopscape.integrations.lmeval", "main"),
    (["sweep"], "loopscape.experiments.sweep", "run_sweep"),
    (["theory"], "loopscape.experiments.theory", "run_theory"),
    (["algorithmic"], "loopscape.experiments.algorithmic", "run_algorithmic"),
]


def _invoke_raising(monkeypatch, tmp_path, args, module, name, error):
    import importlib

    def fail(*_, **__):
        raise error

    monkeypatch.setattr(importlib.import_module(module), name, fail)
    out = tmp_path / "out"
    args = [str(tmp_path) if a == "OUT" else a for a in args]
    return runner.invoke(app, args if args[0] == "lm-eval" else [*args, "-o", str(out)])


@pytest.mark.parametrize(
    "error, code",
    [
        # before: a traceback (markov, reproduce, ...), exit 1 (algorithmic) or exit 2 (loop-sweep); now bad input
        (ValueError("widget must be one of ('a', 'b')\n(got 'c')"), 2),
        (DivergenceError("training diverged: loss is nan at epoch 3"), 1),  # a failed run
    ],
    ids=["value-error", "divergence"],
)
@pytest.mark.parametrize("args, module, name", STUDIES, ids=[a[0] for a, _, _ in STUDIES])
def test_every_command_turns_an_error_into_one_line_and_its_exit_code(
    monkeypatch, tmp_path, args, module, name, error, code
):
    r = _invoke_raising(monkeypatch, tmp_path, args, module, name, error)
    assert r.exit_code == code, r.output
    assert one_line(r) == "error: " + str(error).replace("\n", " ")


def test_a_bug_is_still_a_traceback(monkeypatch, tmp_path):
    r = _invoke_raising(monkeypatch, tmp_path, ["markov"], "loopscape.experiments.markov", "run_markov_study", KeyError)
    assert isinstance(r.exception, KeyError) and r.exit_code == 1


def test_loop_sweep_names_the_flag_of_a_value_that_is_no_number(tmp_path):
    base = ["loop-sweep", "--model", str(tmp_path), "-o", str(tmp_path / "out")]
    r = runner.invoke(app, [*base, "--thresholds", "1e-3,small"])
    assert r.exit_code == 2
    assert one_line(r) == "error: --thresholds must be comma-separated numbers, e.g. 1e-4,1e-3 (got '1e-3,small')"
    r = runner.invoke(app, [*base, "--layers", "1,two"])
    assert (r.exit_code, one_line(r)) == (2, "error: --layers must be START,STOP (got '1,two')")


# --- a flag and a --set on one setting ---


def test_a_section_given_a_value_beside_a_flag_inside_it_says_what_to_give(tmp_path):
    r = runner.invoke(app, ["markov", "--epochs", "3", "--set", "train=5", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert one_line(r) == "error: --set train=5: train is a section; give a setting inside it (e.g. train.epochs=5)"
    r = runner.invoke(app, ["markov", "--set", "train=5", "--set", "train.lr=0.1", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert one_line(r) == "error: --set train=5: train is a section; give a setting inside it (e.g. train.lr=5)"


def test_a_section_given_a_value_in_a_file_says_so(tmp_path):
    (tmp_path / "c.yaml").write_text("train: 5\n")
    r = runner.invoke(app, ["markov", "-c", str(tmp_path / "c.yaml"), "--epochs", "3", "-o", str(tmp_path / "out")])
    assert (r.exit_code, one_line(r)) == (2, "error: train is a section; give a setting inside it (got 5)")


# (command and arguments, the one line after "error: ")
CONFLICTS = [
    (
        ["markov", "--epochs", "3", "--set", "train.epochs=abc"],
        "--epochs 3 and --set train.epochs=abc set train.epochs to different values; give one of them",
    ),
    (
        ["markov", "--epochs", "3", "--set", "train={epochs: 4}"],
        "--epochs 3 and --set train={epochs: 4} set train.epochs to different values; give one of them",
    ),
    (
        ["markov", "--seeds", "0-2", "--set", "seeds=[0, 1]"],
        "--seeds 0-2 and --set seeds=[0, 1] set seeds to different values; give one of them",
    ),
    (
        ["length-readings", "--epochs", "3", "--set", "train.epochs=4"],
        "--epochs 3 and --set train.epochs=4 set train.epochs to different values; give one of them",
    ),
    (
        ["sweep", "--seeds", "1", "--set", "seeds=2"],
        "--seeds 1 and --set seeds=2 set seeds to different values; give one of them",
    ),
    (
        ["languages", "--seeds", "0-9", "--set", "seeds=[3]"],
        "--seeds 0-9 and --set seeds=[3] set seeds to different values; give one of them",
    ),
    (
        ["theory", "--epochs", "5", "--set", "alignment_epochs=6"],
        "--epochs 5 and --set alignment_epochs=6 set alignment_epochs to different values; give one of them",
    ),
    (
        ["theory", "--seeds", "0", "--set", "alignment_seeds=[1]"],
        "--seeds 0 and --set alignment_seeds=[1] set alignment_seeds to different values; give one of them",
    ),
    (
        ["reproduce", "--seeds", "0,1", "--set", "markov.seeds=[0, 2]"],
        "--seeds 0,1 and --set markov.seeds=[0, 2] set markov.seeds to different values; give one of them",
    ),
    (
        ["reproduce", "--quick", "--set", "scale=full"],
        "--quick and --set scale=full set scale to different values; give one of them",
    ),
    (
        ["retrofit", "--model", "ckpt", "--set", "model_path=other"],
        "--model ckpt and --set model_path=other set model_path to different values; give one of them",
    ),
    (
        ["retrofit", "--data", "a.txt", "--set", "data_path=b.txt"],
        "--data a.txt and --set data_path=b.txt set data_path to different values; give one of them",
    ),
    (
        ["retrofit", "--seeds", "0", "--set", "seeds=[1]"],
        "--seeds 0 and --set seeds=[1] set seeds to different values; give one of them",
    ),
    (
        ["algorithmic", "--steps", "10", "--set", "train.steps=20"],
        "--steps 10 and --set train.steps=20 set train.steps to different values; give one of them",
    ),
    (
        ["algorithmic", "--seed", "1", "--set", "seed=2"],
        "--seed 1 and --set seed=2 set seed to different values; give one of them",
    ),
    (
        ["algorithmic", "--task", "copy", "--set", "task=parity"],
        "--task copy and --set task=parity set task to different values; give one of them",
    ),
    (
        ["algorithmic", "-p", "single,looped", "--set", "paradigms=[single]"],
        "--paradigm single,looped and --set paradigms=[single] set paradigms to different values; give one of them",
    ),
    (["algorithmic", "--seeds", "0,1", "--set", "seed=5"], "give --set seed or --seeds, not both"),
]


@pytest.mark.parametrize("args, message", CONFLICTS, ids=[" ".join(a[:2]) for a, _ in CONFLICTS])
def test_a_flag_and_a_set_with_different_values_are_refused_naming_both(tmp_path, args, message):
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2, r.output
    assert one_line(r) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def _capture(monkeypatch, module, name):
    """Replace a command's study by one that keeps the config it was given and ends the command (exit 0)."""
    import importlib

    seen = []

    def keep(cfg, *_, **__):
        seen.append(cfg)
        raise typer.Exit(0)

    monkeypatch.setattr(importlib.import_module(module), name, keep)
    return seen


# (command and arguments, the study it runs, the setting's path in its config, the value it must have)
AGREEING = [
    (["markov", "--epochs", "3", "--set", "train.epochs=3"], "markov", "run_markov_study", "train.epochs", 3),
    (["markov", "--epochs", "3", "--set", "train={epochs: 3}"], "markov", "run_markov_study", "train.epochs", 3),
    (["markov", "--seeds", "0-2", "--set", "seeds=[0,1,2]"], "markov", "run_markov_study", "seeds", [0, 1, 2]),
    (["markov", "--seeds", "4", "--set", "seeds=4"], "markov", "run_markov_study", "seeds", [4]),
    (["theory", "--epochs", "5", "--set", "alignment_epochs=5"], "theory", "run_theory", "alignment_epochs", 5),
    (["reproduce", "--quick", "--set", "scale=quick"], "reproduce", "run_reproduce", "scale", "quick"),
    (["retrofit", "--seeds", "0,1", "--set", "seeds=[0, 1]"], "retrofit", "run_retrofit", "seeds", [0, 1]),
    (["algorithmic", "--seed", "2", "--set", "seed=2"], "algorithmic", "run_algorithmic", "seed", 2),
    (["algorithmic", "--task", "copy", "--set", "task=copy"], "algorithmic", "run_algorithmic", "task", "copy"),
    # --paradigm not given: --set paradigms overrides its default, as before
    (["algorithmic", "--set", "paradigms=[single]"], "algorithmic", "run_algorithmic", "paradigms", ["single"]),
    (
        ["algorithmic", "-p", "looped", "--set", "paradigms=looped"],
        "algorithmic",
        "run_algorithmic",
        "paradigms",
        ["looped"],
    ),
    # no --task: --set task picks the task, as before
    (["algorithmic", "--set", "task=copy"], "algorithmic", "run_algorithmic", "task", "copy"),
]


@pytest.mark.parametrize("args, module, name, path, value", AGREEING, ids=[" ".join(a[:3]) for a, *_ in AGREEING])
def test_a_flag_and_a_set_with_the_same_value_are_fine(monkeypatch, tmp_path, args, module, name, path, value):
    seen = _capture(monkeypatch, f"loopscape.experiments.{module}", name)
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    for part in path.split("."):
        cfg = getattr(cfg, part)
    assert cfg == value
