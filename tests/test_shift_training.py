import pytest
import torch

from loopscape.experiments.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import single_attn
from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.training import ShiftController
from loopscape.training.trainer import TrainConfig, seeded, train

TASK = build_task(MarkovDataConfig(n_train=120, n_val=60))[1]
CFG = TrainConfig(epochs=8, batch_size=16, checkpoint_every=3)


def fresh():
    with seeded(0):
        return single_attn(max_len=3)


def numbers(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_switch_keeps_every_parameter_and_changes_loops_at_the_right_epoch(tmp_path):
    model = fresh()
    opt = torch.optim.Adam(model.parameters())
    ctl = ShiftController(n_loops=3, at_epoch=4)
    ctl.begin(model)
    assert model.n_loops == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctl.after_epoch(3, {}, model, opt)
    assert model.n_loops == 1
    ctl.after_epoch(4, {}, model, opt)
    assert model.n_loops == 3 and ctl.shift_epoch == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    rows = train(fresh(), TASK, CFG, tmp_path / "shift", seed=0, controller=ShiftController(n_loops=3, at_epoch=4))
    assert [r["n_loops"] for r in rows] == [1] * 5 + [3] * 4  # epochs 0..4 Single-Attn, 5..8 Looped-Attn
    plain = train(fresh(), TASK, TrainConfig(epochs=4, batch_size=16, checkpoint_every=3), tmp_path / "plain", seed=0)
    assert numbers(plain) == [{k: v for k, v in r.items() if k != "n_loops"} for r in numbers(rows)[:5]]


@pytest.mark.parametrize("optimizer", ["keep", "reset"])
def test_optimizer_state_at_the_switch(optimizer):
    model = fresh()
    opt = torch.optim.Adam(model.parameters())
    model(TASK.train.inputs).sum().backward()
    opt.step()
    ShiftController(n_loops=3, at_epoch=1, optimizer=optimizer).after_epoch(1, {}, model, opt)
    assert (len(opt.state) == 0) == (optimizer == "reset")


@pytest.mark.parametrize("make", [lambda: ShiftController(n_loops=3, at_epoch=4), lambda: ShiftController(n_loops=3, criterion=ShiftCriterion(patience=1, min_delta=10.0, wait=1, grad_tol=10.0))])
def test_resume_across_the_switch_equals_uninterrupted(tmp_path, make):
    full = train(fresh(), TASK, CFG, tmp_path / "full", seed=0, controller=make())
    assert any(r["n_loops"] == 3 for r in full)

    def crash_at_5(epoch):
        if epoch == 5:  # after the switch, before the next checkpoint (6); resumes from 3, before the switch
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(fresh(), TASK, CFG, tmp_path / "cut", seed=0, controller=make(), on_epoch=crash_at_5)
    resumed = train(fresh(), TASK, CFG, tmp_path / "cut", seed=0, controller=make(), resume=True)
    assert numbers(resumed) == numbers(full)


def test_controller_settings_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        ShiftController(n_loops=3)
    with pytest.raises(ValueError, match="optimizer"):
        ShiftController(n_loops=3, at_epoch=1, optimizer="adam")
