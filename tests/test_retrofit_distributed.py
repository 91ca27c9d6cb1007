"""The retrofit beyond one process: 2 gloo processes under torchrun, DDP and FSDP2 (``fully_shard``), on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from hf_families import tiny_llama  # noqa: E402

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def test_ddp_and_fsdp_gradients_equal_one_process_and_ranks_switch_together(tmp_path):
    """A looped Llama (3 loops, truncated backprop through 2) in float64: with each rank on half the batch,
    every weight's gradient equals the one-process gradient of the whole batch (to rounding), under DDP and
    under FSDP2, whose per-layer gathering runs the looped layers 3 times per forward; an SCP decision taken on
    rank 0's validation loss is every rank's; the concat adapter, unused at one loop, does not stop DDP."""
    script = str(HERE / "distributed" / "gradients.py")
    finish(torchrun(1, script, "one", str(tmp_path)))
    for how in ("ddp", "fsdp"):
        finish(torchrun(2, script, how, str(tmp_path)))
    one = torch.load(tmp_path / "one-rank0.pt", weights_only=True)
    for how in ("ddp", "fsdp"):
        ranks = [torch.load(tmp_path / f"{how}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for r in ranks:
            assert r["grads"].keys() == one["grads"].keys()
            for name, g in one["grads"].items():
                assert torch.allclose(r["grads"][name], g, rtol=1e-12, atol=1e-15), (how, name)
        # rank 1's own loss kept falling (alone it never switches); it switched with rank 0, at step 5
        assert ranks[0]["depths"] == ranks[1]["depths"] == [1] * 4 + [3] * 11
        assert ranks[0]["stage1_steps"] == 2  # a concat adapter unused at one loop trains under DDP and FSDP


def _worker(parent: int, rank: int) -> int | None:
    """The pid of ``torchrun``'s worker of ``rank`` (read from its environment)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_retrofit_under_torchrun_resumes_after_one_rank_is_killed(tmp_path, parallel):
    """SIGKILL rank 1 inside the SHIFT arm after its first checkpoint: torchrun stops the run; --resume under
    torchrun ends with the weights of an uninterrupted 2-process run, bit for bit, and with those of one
    process to rounding (float64)."""
    torch.manual_seed(0)
    config = tiny_llama(hidden_size=16)
    model = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    study = [
        "-m", "loopscape.cli", "retrofit", "--model", str(model), "--data", "pydoc", "--seeds", "0", "-q",
        "--set", "arms=[plain,shift]", "--set", "budget_steps=40", "--set", "checkpoint_every=4",
        "--set", "eval_every=40", "--set", "dtype=float64", "--set", f"parallel={parallel}", "--set", "context=16",
        "--set", "batch_size=4", "--set", "eval_windows=2", "--set", "test_loops=[1,3]", "--set", "loop_layers=[1,3]",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    proc = torchrun(2, *study, "-o", str(killed))
    arm = killed / "seed0" / "shift"
    deadline = time.monotonic() + 180
    while not (arm / "checkpoints" / "latest.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    victim = _worker(proc.pid, 1)
    assert victim is not None, "no rank-1 worker found"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (arm / "result.json").exists(), "killed too late: the arm had finished"
    finish(torchrun(2, *study, "-o", str(killed), "--resume"))
    finish(torchrun(2, *study, "-o", str(tmp_path / "whole")))
    one = tmp_path / "one"
    assert subprocess.run([sys.executable, *study, "-o", str(one)], env=ENV).returncode == 0
    weights = {r: load_file(str(tmp_path / r / "seed0" / "shift" / "model" / "model.safetensors")) for r in
               ("killed", "whole", "one")}  # fmt: skip
    assert all(torch.equal(weights["killed"][k], weights["whole"][k]) for k in weights["whole"])
    assert all(torch.allclose(weights["one"][k], weights["whole"][k], rtol=1e-9, atol=1e-12) for k in weights["one"])
    results = [json.loads((tmp_path / r / "seed0" / "shift" / "result.json").read_text()) for r in ("killed", "one")]
    assert results[0]["depths"] == results[1]["depths"] and 3 in results[0]["depths"]
    assert results[0]["perplexity"]["3"] == pytest.approx(results[1]["perplexity"]["3"], rel=1e-9)


def test_a_run_folder_refused_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 alone prepares the run folder; when it refuses (a folder in use, no --resume), the other rank
    stops with it instead of waiting for rank 0 forever."""
    model = tmp_path / "model"
    transformers.LlamaForCausalLM(tiny_llama(hidden_size=16)).save_pretrained(model)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's run")
    study = [
        "-m", "loopscape.cli", "retrofit", "--model", str(model), "--data", "pydoc", "-o", str(out), "-q",
        "--set", "context=16", "--set", "batch_size=4", "--set", "eval_windows=2", "--set", "test_loops=[1,3]",
        "--set", "loop_layers=[1,3]",
    ]  # fmt: skip
    proc = torchrun(2, *study)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert err.count("already exists and is not empty") == 2, err[-2000:]  # rank 0's own line, and rank 1's
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
