"""SHIFT's one schedule (loopscape.shift.schedule) on its own and inside the Markov trainer."""

import pytest
import torch

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import single_attn
from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.run import seeded

TASK = build_task(MarkovDataConfig(n_train=120, n_val=60))[1]
CFG = MarkovTrainConfig(epochs=8, batch_size=16, checkpoint_every=3)


def fresh():
    with seeded(0):
        return single_attn(max_len=3)


def numbers(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def scp():
    return ShiftCriterion(
        patience=1, min_delta=10.0, wait=1, grad_tol=10.0
    )  # best at evaluation 1, plateau at 2, shift at 3


def test_fixed_switch_point_is_the_last_single_attn_unit():
    s = ShiftSchedule.fixed(3, at=4)
    assert [s.n_loops_at(step) for step in range(1, 8)] == [1, 1, 1, 1, 3, 3, 3]
    assert [s.observe(step) for step in range(1, 7)] == [False, False, False, True, False, False]
    assert [s.shifted_by(step) for step in (3, 4, 5)] == [False, True, True]
    assert ShiftSchedule.fixed(3, at=0).n_loops_at(1) == 3  # Looped-Attn from the start


def test_scp_switches_after_the_evaluation_where_it_fires():
    s = ShiftSchedule.scp(3, scp())
    assert s.observe(9, val_loss=1.0, grad_norm=1.0) is False  # best so far
    assert s.observe(10, val_loss=1.0, grad_norm=1.0) is False  # plateau
    assert s.n_loops_at(11) == 1
    assert s.observe(11, val_loss=1.0, grad_norm=1.0) is True  # shift
    assert s.shift_step == 11 and s.n_loops_at(11) == 1 and s.n_loops_at(12) == 3
    assert s.observe(12, val_loss=1.0, grad_norm=1.0) is False  # once
    restored = ShiftSchedule.scp(3, scp())
    restored.load_state_dict(s.state_dict())
    assert restored.shift_step == 11 and restored.criterion.shifted


def test_progressive_schedule_follows_its_milestones():
    s = ShiftSchedule.progressive({2: 2, 5: 4})
    assert [s.n_loops_at(step) for step in range(1, 8)] == [1, 1, 2, 2, 2, 4, 4]
    assert [s.observe(step) for step in range(1, 7)] == [False, True, False, False, True, False]
    assert s.shift_step == 2


def test_switch_keeps_every_parameter_and_changes_loops_at_the_right_epoch(tmp_path):
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = train_markov(model, TASK, CFG, tmp_path / "shift", seed=0, schedule=ShiftSchedule.fixed(3, at=4))
    assert [r["n_loops"] for r in rows] == [1] * 5 + [3] * 4  # epochs 0..4 Single-Attn, 5..8 Looped-Attn
    assert model.n_loops == 3 and set(model.state_dict()) == set(before)
    plain = train_markov(
        fresh(), TASK, MarkovTrainConfig(epochs=4, batch_size=16, checkpoint_every=3), tmp_path / "plain", seed=0
    )
    assert numbers(plain) == [{k: v for k, v in r.items() if k != "n_loops"} for r in numbers(rows)[:5]]


@pytest.mark.parametrize("optimizer", ["keep", "reset"])
def test_optimizer_state_at_the_switch(tmp_path, optimizer):
    """With 'reset', Adam after the switch starts from fresh moments: the run equals one whose
    optimiser is rebuilt at the switch; with 'keep' it differs from that."""
    config = MarkovTrainConfig(epochs=3, batch_size=16, checkpoint_every=100)
    rows = train_markov(
        fresh(), TASK, config, tmp_path / "run", seed=0, schedule=ShiftSchedule.fixed(3, at=2, optimizer=optimizer)
    )
    # the same run by hand: 2 epochs Single-Attn, then a fresh Adam for Looped-Attn's epoch, same batch order
    model = fresh()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for epoch in (1, 2, 3):
        if epoch == 3:
            model.n_loops = 3
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        for idx in torch.randperm(len(TASK.train), generator=g).split(config.batch_size):
            loss = torch.nn.functional.cross_entropy(model(TASK.train.inputs[idx]), TASK.train.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(TASK.train.inputs).argmax(-1) == TASK.train.targets).float().mean().item()
        loss = torch.nn.functional.cross_entropy(model(TASK.train.inputs), TASK.train.targets).item()
    assert (abs(rows[-1]["train_loss"] - loss) < 1e-6) == (optimizer == "reset")
    if optimizer == "reset":
        assert rows[-1]["acc_all"] == pytest.approx(acc)


@pytest.mark.parametrize("make", [lambda: ShiftSchedule.fixed(3, at=4), lambda: ShiftSchedule.scp(3, scp())])
def test_resume_across_the_switch_equals_uninterrupted(tmp_path, make):
    full = train_markov(fresh(), TASK, CFG, tmp_path / "full", seed=0, schedule=make())
    assert any(r["n_loops"] == 3 for r in full)

    def crash_at_5(epoch):
        if epoch == 5:  # after the switch, before the next checkpoint (6); resumes from 3, before the switch
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_markov(fresh(), TASK, CFG, tmp_path / "cut", seed=0, schedule=make(), on_epoch=crash_at_5)
    resumed = train_markov(fresh(), TASK, CFG, tmp_path / "cut", seed=0, schedule=make(), resume=True)
    assert numbers(resumed) == numbers(full)


def test_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        ShiftSchedule(3)
    with pytest.raises(ValueError, match="exactly one"):
        ShiftSchedule(3, at=1, criterion=scp())
    with pytest.raises(ValueError, match="optimizer"):
        ShiftSchedule.fixed(3, at=1, optimizer="adam")
    with pytest.raises(ValueError, match="n_loops must be >= 2"):
        ShiftSchedule.fixed(1, at=1)
    with pytest.raises(ValueError, match="milestones"):
        ShiftSchedule(3, milestones={2: 5})


def test_the_switch_has_one_name_on_disk_and_old_run_folders_still_read():
    from loopscape.shift.schedule import SWITCH_KEY, recorded_switch

    assert SWITCH_KEY == "shift_step"
    assert [recorded_switch(r) for r in ({"shift_step": 9}, {"shifted_at": 7}, {"shift_epoch": 5}, {"step": 3})] == [
        9,
        7,
        5,
        None,
    ]
    assert recorded_switch({"shift_step": None}) is None  # a run that recorded that it never switched


def test_the_stage_is_one_until_the_switch_and_two_after():
    from loopscape.shift.schedule import ShiftSchedule

    schedule = ShiftSchedule.fixed(5, at=3)
    assert [schedule.stage(s) for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert [schedule.stage(s) for s in range(1, 7)] == [1 + (schedule.n_loops_at(s) > 1) for s in range(1, 7)]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"milestones": {}}, "milestones must map at least one step"),
        ({"scp": {"patiense": 3}}, "scp must hold ShiftCriterion's settings .* \\(got patiense\\)"),
        ({"at": 3, "milestones": {5: 2}}, "give at most one of .*got at and milestones"),
    ],
)
def test_shift_settings_that_cannot_build_a_schedule_are_one_line(settings, message):
    from loopscape.shift.schedule import ShiftConfig

    with pytest.raises(ValueError, match=message):
        ShiftConfig(3, **settings).build()


def test_the_controller_reads_states_written_before_it_existed():
    """Markov checkpoints kept {"schedule": ...}, population checkpoints the schedule's state bare."""
    from loopscape.shift.controller import ShiftController
    from loopscape.shift.criterion import ShiftCriterion
    from loopscape.shift.schedule import ShiftSchedule

    fired = ShiftSchedule.scp(3, ShiftCriterion(patience=1, min_delta=10.0, wait=1, max_wait=1))
    for e in (1, 2, 3):
        fired.observe(e, 1.0, 1.0)
    assert fired.shift_step is not None
    for old in ({"schedule": fired.state_dict()}, fired.state_dict()):
        c = ShiftController(ShiftSchedule.scp(3, ShiftCriterion()))
        c.load_state_dict(old)
        assert c.schedule.shift_step == fired.shift_step and c.switches == []
