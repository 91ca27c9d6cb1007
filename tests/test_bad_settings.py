"""A table of bad settings and inputs: each ends in exactly one line naming the field (or file) and what
is allowed, exit code 2, no traceback and nothing trained."""

import pytest
from typer.testing import CliRunner

from loopscape.cli import app

TASKS = "('parity', 'copy', 'addition', 'binary_sum', 'unique_set', 'multiplication')"

CASES = [
    # (command and arguments, the one line after "error: ")
    (["markov", "--set", "train.lr=-1"], "train.lr must be a number > 0 (got -1.0)"),
    (["markov", "--set", "train.lr=.nan"], "train.lr must be a finite number (got nan)"),
    (["markov", "--set", "train.lr=.inf"], "train.lr must be a finite number (got inf)"),
    (["markov", "--set", "train.epochs=1.5"], "train.epochs must be an integer (got 1.5)"),
    (["markov", "--set", "train.epochs=abc"], "train.epochs must be an integer (got 'abc')"),
    (["markov", "--set", "seeds=[]"], "seeds must be a non-empty list of integers (got [])"),
    (["markov", "--set", "seeds=[1, 1]"], "seeds must be distinct integers (got [1, 1])"),
    (["markov", "--seeds", "a,b"], "--seeds must be comma-separated integers or ranges like 0-399 (got 'a,b')"),
    (["markov", "--set", "data.test_lengths=[]"], "data.test_lengths must be a non-empty list of lengths (got [])"),
    (["markov", "--set", "data.vocab_size=1"], "data.vocab_size must be an integer >= 2 (got 1)"),
    (
        ["markov", "--set", "model.positions=spiral"],
        "model.positions must be one of ['absolute', 'cyclic', 'cyclic_end'] (got 'spiral')",
    ),
    (["markov", "--set", "model.vocab_size=4"], "model.vocab_size must be null or data.vocab_size (3) (got 4)"),
    (
        ["markov", "--set", "train.nosuch=1"],
        "train.nosuch must be one of ['batch_size', 'checkpoint_every', 'epochs', 'lr', 'tensorboard'] (got 'nosuch')",
    ),
    (
        ["markov", "--set", "train=1"],
        "train must be a table of settings (epochs, lr, batch_size, checkpoint_every, tensorboard); set one with "
        "--set train.<setting>=<value> (got 1)",
    ),
    (
        ["markov", "--seeds", "99999999999999999999"],
        "seeds must be integers from 0 to 9223372036854775807 (2^63 - 1) (got 99999999999999999999)",
    ),
    (
        ["reproduce", "--set", "markov.model.n_loops=1"],
        "markov.model.n_loops must be an integer >= 2 (Looped-Attn's T; Single-Attn is the one-loop model, trained "
        "beside it) (got 1)",
    ),
    (["markov", "--set", "=3"], "override must look like key.sub=value (got '=3')"),
    (
        ["markov", "--set", "train.lr=[1"],
        "--set train.lr: the value '[1' does not parse (expected ',' or ']', but got '<stream end>')",
    ),
    (["markov", "--set", "hessian.enabled=maybe"], "hessian.enabled must be true or false (got 'maybe')"),
    (["reproduce", "--set", "scale=medium"], "scale must be one of ('full', 'quick') (got 'medium')"),
    (
        ["reproduce", "--set", "shift.tolerance=2"],
        "shift.tolerance must be a number in [0, 1) (accuracy, not percent) (got 2.0)",
    ),
    (["reproduce", "--set", "theory.kappas=[]"], "theory.kappas must be a non-empty list of numbers > 1 (got [])"),
    (
        ["reproduce", "--set", "algorithmic.tasks=[chess]"],
        f"algorithmic.tasks must be a list from {TASKS} (got ['chess'])",
    ),
    (
        ["algorithmic", "--task", "chess"],
        f"task must be one of {TASKS} (got 'chess')",
    ),
    (["algorithmic", "--preset", "huge"], "preset must be one of ('cpu-small', 'paper', 'authors') (got 'huge')"),
    (
        ["algorithmic", "-p", "fancy"],
        "paradigms must be a non-empty list from ('single', 'looped', 'shift') (got ['fancy'])",
    ),
    (["algorithmic", "--set", "model.n_heads=3"], "model.n_heads must divide d_model (got d_model=32, n_heads=3)"),
    (["algorithmic", "--set", "train.precision=fp8"], "train.precision must be one of ('fp32', 'bf16') (got 'fp8')"),
    (["algorithmic", "--seed", "1", "--seeds", "1,2"], "give --seed or --seeds, not both"),
    # a section given a value beside a flag inside it; a flag and a --set that disagree (issue 35)
    (
        ["markov", "--epochs", "3", "--set", "train=5"],
        "--set train=5: train is a section; give a setting inside it (e.g. train.epochs=5)",
    ),
    (
        ["markov", "--epochs", "3", "--set", "train.epochs=abc"],
        "--epochs 3 and --set train.epochs=abc set train.epochs to different values; give one of them",
    ),
    (["algorithmic", "--seeds", "1,2", "--set", "seed=1"], "give --set seed or --seeds, not both"),
]  # every flag against its --set: tests/test_cli_errors.py


@pytest.mark.parametrize("args, message", CASES)
def test_bad_setting_is_one_line(tmp_path, args, message):
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out"), "-q"])
    assert (r.exit_code, r.output.strip()) == (2, f"error: {message}")
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("- 1\n- 2\n", ".yaml", "must be a mapping of settings at its top level (got 'list')"),
        (
            "train: {epochs: [\n",
            ".yaml",
            "is not valid YAML at line 2: expected the node content, but found '<stream end>'",
        ),
        (
            "[train\nepochs=",
            ".toml",
            "is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)",
        ),
        ("epochs: 3\n", ".txt", None),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, content, suffix, message):
    path = tmp_path / f"settings{suffix}"
    path.write_text(content)
    r = CliRunner().invoke(app, ["markov", "-c", str(path), "-o", str(tmp_path / "out"), "-q"])
    expected = (
        f"error: config file must end in .yaml, .yml or .toml (got 'settings{suffix}')"
        if message is None
        else f"error: config file '{path}' {message}"
    )
    assert (r.exit_code, r.output.strip()) == (2, expected)


def test_output_that_is_a_file_or_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(app, ["markov", "-o", str(tmp_path / "file"), "-q"])
    assert (r.exit_code, r.output.strip()) == (
        2,
        f"error: output folder '{tmp_path / 'file'}' is a file, not a folder; choose another --output",
    )
    r = CliRunner().invoke(app, ["markov", "-o", str(tmp_path / "file" / "run"), "-q"])
    assert r.exit_code == 2 and r.output.strip().startswith(
        f"error: output folder '{tmp_path / 'file' / 'run'}' cannot be written"
    )


def test_sizes_that_would_not_fit_say_so_with_the_limit(tmp_path):
    r = CliRunner().invoke(app, ["markov", "--set", "data.n_train=100000000000", "-o", str(tmp_path / "o"), "-q"])
    line = r.output.strip()
    assert r.exit_code == 2 and line.startswith(
        "error: data.n_train, n_val, n_test must be small enough to fit in memory"
    )
    assert "this machine has" in line and "GiB" in line
    r = CliRunner().invoke(app, ["algorithmic", "--set", "train.batch_size=100000000", "-o", str(tmp_path / "a"), "-q"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: train.batch_size must be small enough to fit")


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """Writing fails with ENOSPC (as on a full disk): one line naming the file, exit 1, no traceback."""
    import errno

    import loopscape.io

    real = loopscape.io.atomic_write_bytes

    def full_disk(path, data):
        if str(path).endswith("data.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(loopscape.io, "atomic_write_bytes", full_disk)
    r = CliRunner().invoke(app, ["markov", "-o", str(tmp_path / "run"), "--epochs", "2", "--seeds", "0", "-q"])
    assert (r.exit_code, r.output.strip()) == (
        1,
        f"error: cannot read or write {tmp_path / 'run' / 'data.json'}: No space left on device",
    )


@pytest.mark.parametrize("setting", ["data.vocab_size=300", "data.length=40"])
def test_a_language_too_large_to_enumerate_is_refused_with_its_size(tmp_path, setting):
    """The training set enumerates V^L sequences: 300^4 or 3^40 would exhaust memory (or hang) before a line."""
    extra = ["--set", "model.max_len=39", "--set", "data.test_lengths=[40]"] if "length" in setting else []
    r = CliRunner().invoke(app, ["markov", "--set", setting, *extra, "-o", str(tmp_path / "out"), "-q"])
    line = r.output.strip()
    assert r.exit_code == 2 and "\n" not in line, line
    assert line.startswith("error: data.vocab_size, length must be small enough to fit in memory (the ")
    assert "sequences the training set enumerates: about" in line and not (tmp_path / "out").exists()


def test_a_refused_output_folder_is_left_exactly_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = CliRunner().invoke(app, ["markov", "-o", str(out), "-q", "--epochs", "1"])
    assert r.exit_code == 2 and "already exists and is not empty" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # no .lock, no .workers.lock
