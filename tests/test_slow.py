"""Long end-to-end checks: `python -m pytest -m slow` (a few minutes on 2 cores)."""

import json

import pytest
from typer.testing import CliRunner

from loopscape.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_full_length_study_is_deterministic_and_respects_the_bayes_ceiling(tmp_path):
    args = ["--seeds", "0,1", "--set", "workers=2", "-q"]
    for name in ("a", "b"):
        r = runner.invoke(app, ["markov", "-o", str(tmp_path / name), *args])
        assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["table"] == b["table"] and a["observation2"] == b["observation2"]
    ceiling = 100 * a["bayes_ceiling"]["all"]
    for model in a["table"].values():
        assert max(model["acc_all@final"]) <= ceiling + 1e-6
    metrics = (tmp_path / "a" / "runs" / "looped_attn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    spectra = (tmp_path / "a" / "runs" / "looped_attn" / "seed0" / "spectra.jsonl").read_text().splitlines()
    assert len(metrics) == len(spectra) == 601
