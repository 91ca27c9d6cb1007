"""Divergence is an error: a NaN or infinite loss or gradient stops the run, marked failed, with one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from loopscape.cli import app
from loopscape.data.algorithmic import AlgorithmicTask, Curriculum
from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.errors import DivergenceError
from loopscape.landscape.hessian import HessianOperator, NonFiniteLossError, StochasticLossError, weighted_batches
from loopscape.models.linear_attn import single_attn
from loopscape.models.looped_gpt import looped_gpt
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.algorithmic import AlgorithmicTrainConfig, train_algorithmic
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.population import train_population
from loopscape.training.run import seeded

TASK = build_task(MarkovDataConfig(n_train=120, n_val=60))[1]
HUGE_LR = MarkovTrainConfig(epochs=5, batch_size=16, lr=1e6, checkpoint_every=2)


def fresh():
    with seeded(0):
        return single_attn(max_len=3)


def test_markov_trainer_stops_and_marks_the_run_failed(tmp_path):
    with pytest.raises(DivergenceError, match=r"epoch 1: .*(nan|inf).*train\.lr \(now 1000000\.0\)"):
        train_markov(fresh(), TASK, HUGE_LR, tmp_path, seed=0)
    assert "diverged" in json.loads((tmp_path / "failed.json").read_text())["error"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]  # the diverged epoch is not logged
    assert not (tmp_path / "model.safetensors").exists()


def test_population_names_the_member(tmp_path):
    schedules = [ShiftSchedule.fixed(3, at=2), ShiftSchedule.fixed(3, at=0)]
    with pytest.raises(DivergenceError, match=r"member 0 \(seed 4\), epoch 1"):
        train_population([fresh(), fresh()], [4, 5], schedules, TASK, HUGE_LR, tmp_path)
    assert (tmp_path / "failed.json").exists()


def test_algorithmic_trainer_names_the_step(tmp_path):
    torch.manual_seed(0)
    task = AlgorithmicTask("parity")
    model = looped_gpt(task.vocab_size, d_model=16, n_heads=2, n_layers=1)
    config = AlgorithmicTrainConfig(steps=30, eval_every=10, eval_size=16, batch_size=8, lr=1e12, grad_clip=1e30)
    with pytest.raises(DivergenceError, match=r"\(looped\), step \d+: .*train\.lr \(now 1000000000000\.0\)"):
        train_algorithmic(model, task, "looped", config, Curriculum(4, 3), tmp_path)
    assert (tmp_path / "failed.json").exists()


def test_cli_prints_one_line_and_exits_1(tmp_path):
    args = ["markov", "-o", str(tmp_path / "run"), "--epochs", "3", "--seeds", "0", "-q"]
    r = CliRunner().invoke(app, [*args, "--set", "train.lr=1e6", "--set", "hessian.enabled=false"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged:") and "train.lr" in lines[0]


def test_hessian_of_a_diverged_model_names_nan_not_dropout():
    model = fresh()
    with torch.no_grad():
        model.W_V.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="the loss is nan") as err:
        HessianOperator(model, weighted_batches(TASK.train.inputs, TASK.train.targets), dtype=torch.float64)
    assert isinstance(err.value, StochasticLossError) and "dropout" not in str(err.value)
