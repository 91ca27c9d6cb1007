"""Things users notice: file modes, the version, help for every option, wall time across resumes."""

import os
import stat

import pytest
import typer.main
from typer.testing import CliRunner

from loopscape.cli import app
from loopscape.config import load_config
from loopscape.experiments.markov import MarkovStudyConfig, timed_across_resumes
from loopscape.io import atomic_write_text, read_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == mode


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == "loopscape 0.1.0"


def test_every_option_of_every_command_has_help():
    command = typer.main.get_command(app)
    missing = [(name, p.name) for name, sub in command.commands.items() for p in sub.params if not p.help]
    assert missing == []


def test_wall_time_adds_up_across_sessions(tmp_path):
    record = tmp_path / "training_wall.json"

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timed_across_resumes(record, crash)
    first = read_json(record)["wall_s"]
    total = timed_across_resumes(record, lambda: None)
    assert total >= first > 0 and read_json(record)["wall_s"] == total


@pytest.mark.parametrize("text, value", [("true", True), ("no", False), ("1", True), ("0", False)])
def test_boolean_settings_accept_the_usual_spellings(text, value):
    from loopscape.config import parse_override

    key, parsed = parse_override(f"hessian.enabled={text}")
    assert load_config(MarkovStudyConfig, None, {key: parsed}).hessian.enabled is value


def test_progress_without_a_terminal_prints_plain_lines(capsys, monkeypatch):
    """Off a terminal a live bar shows only its end: plain lines say how far each labelled job got."""
    from loopscape.experiments import parallel

    monkeypatch.setattr(parallel._LinesOffTerminal, "LINE_EVERY_S", 0.0)
    out = parallel.run_jobs(lambda x, q: 2 * x, [(1,), (2,)], [5, 5], "demo: training 2 runs (epochs)", workers=1)
    assert out == [2, 4]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("demo: training 2 runs (epochs): ")]
    assert [x.split(": ")[2].split(",")[0] for x in lines] == ["5/10 (50%)", "10/10 (100%)"]
