"""SHIFT's one schedule (loopscape.shift.schedule) on its own and inside the Markov trainer."""

import pytest
import torch

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import single_attn
from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftConfig, ShiftSchedule
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
    with pytest.raises(ValueError, match="optimizer"):
        ShiftSchedule.fixed(3, at=1, optimizer="adam")
    with pytest.raises(ValueError, match="n_loops must be >= 2"):
        ShiftSchedule.fixed(1, at=1)
    with pytest.raises(ValueError, match="milestones must map steps >= 0 to loop counts >= 1"):
        ShiftSchedule(3, milestones={2: 0})
    with pytest.raises(ValueError, match="at must be an integer >= 0"):
        ShiftSchedule(3, at=-1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ShiftSchedule(3, at=1, criterion=scp()),
        lambda: ShiftSchedule(3, at=1, scp={}),
        lambda: ShiftSchedule(3, at=1, milestones={2: 2}),
        lambda: ShiftConfig(3, at=1, scp={}).build(),
        lambda: ShiftConfig(3, scp={}, milestones={2: 2}).build(),
        lambda: ShiftSchedule(ShiftConfig(3, at=1, milestones={2: 2})),
    ],
)
def test_one_rule_for_at_scp_and_milestones_in_every_form(make):
    """At most one of at, scp (criterion=) and milestones, in the config and in the shorthand alike (the
    shorthand once asked for exactly one, the config for at most one)."""
    rule = r"give at most one of at \(a fixed switch step\), scp \(SCP's settings\) and milestones \(a progressive "
    with pytest.raises(ValueError, match=rule + r"schedule\); got (at and scp|at and milestones|scp and milestones)$"):
        make()


def test_none_of_at_scp_and_milestones_is_scp_with_its_defaults_in_every_form():
    from loopscape.shift.criterion import SCPConfig
    from loopscape.shift.schedule import ShiftConfig

    for schedule in (ShiftSchedule(3), ShiftConfig(3).build(), ShiftSchedule(ShiftConfig(3))):
        assert schedule.config.policy == "scp" and schedule.criterion == ShiftCriterion()
        assert schedule.criterion.settings() == SCPConfig().settings()
    assert ShiftConfig(3, at=0).policy == "fixed" and ShiftConfig(milestones={1: 2}).policy == "progressive"


def test_milestones_and_n_loops_follow_one_rule_in_every_form():
    """With milestones the schedule's n_loops is the larger of n_loops and their largest count: the shorthand
    refused a milestone above n_loops, the config ignored n_loops."""
    for form in (ShiftSchedule(3, milestones={2: 5}), ShiftConfig(3, milestones={2: 5}).build()):
        assert form.n_loops == 5 and [form.n_loops_at(s) for s in (2, 3)] == [1, 5]
    assert ShiftConfig(5, milestones={2: 2}).build().n_loops == 5 == ShiftSchedule(5, milestones={2: 2}).n_loops
    assert ShiftSchedule.progressive({2: 2, 5: 4}).n_loops == 4


def test_the_shorthands_build_a_shift_config():
    from loopscape.shift.schedule import ShiftConfig

    c = scp()
    cases = [
        (ShiftSchedule.fixed(3, at=4, optimizer="reset"), ShiftConfig(3, at=4, optimizer="reset")),
        (ShiftSchedule.scp(3, c), ShiftConfig(3, scp=c.settings())),
        (ShiftSchedule.progressive({2: 2, 5: 4}), ShiftConfig(milestones={2: 2, 5: 4})),
        (ShiftSchedule.sampled_depth(4, at=2, seed=5), ShiftConfig(4, at=2, depth="uniform", seed=5)),
        (
            ShiftSchedule(16, at=0, depth="poisson-lognormal", mean_depth=4),
            ShiftConfig(16, at=0, depth="poisson-lognormal", mean_depth=4),
        ),
    ]
    for schedule, config in cases:
        assert schedule.config == config
        built = config.build()
        assert [schedule.n_loops_at(k) for k in range(1, 40)] == [built.n_loops_at(k) for k in range(1, 40)]
    fed = ShiftSchedule.scp(3, c)
    assert fed.criterion is c  # the criterion given is the one fed (its state is the caller's to read)
    assert fed.depth == "fixed" and fed.optimizer == "keep" and fed.config.scp.patience == 1  # settings read through
    with pytest.raises(TypeError, match="takes no other settings"):
        ShiftSchedule(ShiftConfig(3, at=1), depth="uniform")
    for config in (ShiftConfig(3, scp={"patience": 4}), ShiftConfig(3, at=2)):
        with pytest.raises(ValueError, match="criterion goes with SCP and must have the settings of config.scp"):
            ShiftSchedule(config, criterion=scp())


def test_scp_settings_are_listed_once_and_the_criterion_is_them_plus_state():
    from dataclasses import fields

    from loopscape.shift.criterion import SCPConfig
    from loopscape.shift.schedule import ShiftConfig

    names = [f.name for f in fields(SCPConfig)]
    assert names == ["patience", "min_delta", "wait", "grad_tol", "max_wait", "shift_by"]
    assert [f.name for f in fields(ShiftCriterion)][: len(names)] == names
    assert ShiftConfig(scp={"patience": 2, "shift_by": 7}).scp == SCPConfig(patience=2, shift_by=7)
    assert ShiftConfig(scp=scp()).scp == SCPConfig(**scp().settings())  # a criterion gives its settings only
    assert SCPConfig(patience=2).build() == ShiftCriterion(patience=2)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        ShiftConfig(scp={"patience": 0})


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
        ({"scp": {"patiense": 3}}, "scp must hold SCP's settings .* \\(got patiense\\)"),
        ({"at": 3, "milestones": {5: 2}}, "give at most one of .*got at and milestones"),
    ],
)
def test_shift_settings_that_cannot_build_a_schedule_are_one_line(settings, message):
    from loopscape.shift.schedule import ShiftConfig

    with pytest.raises(ValueError, match=message):
        ShiftConfig(3, **settings).build()


def test_the_controller_reads_states_written_before_it_existed():
    """Markov checkpoints kept {"schedule": ...}, population checkpoints the schedule's state bare."""
    from loopscape.shift.controller import ShiftController, saved_state
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
        if "schedule" in old:  # where the algorithmic trainer kept it: saved_state finds it there
            c.load_state_dict(saved_state(old))
            assert c.schedule.shift_step == fired.shift_step


class Holder:
    """Anything with a loop count (as a population member is)."""

    n_loops = 1


def adam_with_state():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()
    return opt


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        (lambda: ShiftSchedule.fixed(3, at=2, optimizer="reset"), [1, 2, 3, 3, 4, 5], [0, 0, 1, 1, 1, 1]),
        (lambda: ShiftSchedule.fixed(3, at=2), [1, 2, 3, 4], [0, 0, 0, 0]),  # optimizer="keep": never
        (lambda: ShiftSchedule.progressive({2: 2, 4: 3}, optimizer="reset"), [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2]),
        (lambda: ShiftSchedule(3, at=0, optimizer="reset"), [1, 1, 2], [1, 1, 1]),  # a step announced twice: once
    ],
)
def test_reset_is_called_exactly_when_a_stage_starts(schedule, steps, expected):
    from loopscape.shift.controller import ShiftController

    calls = []
    opt = adam_with_state()
    c = ShiftController(schedule(), Holder(), opt, reset=lambda: calls.append(1))
    seen = []
    for step in steps:
        c.before_step(step)
        seen.append(len(calls))
    assert seen == expected
    assert opt.state  # reset= is the one way the state is cleared: the optimizer's own is left alone


def test_optimizer_still_resets_without_reset():
    from loopscape.shift.controller import ShiftController

    opt = adam_with_state()
    c = ShiftController(ShiftSchedule.fixed(3, at=2, optimizer="reset"), Holder(), opt)
    c.before_step(2)
    assert opt.state
    c.before_step(3)
    assert not opt.state
    with pytest.raises(ValueError, match="reset must be a callable"):
        ShiftController(ShiftSchedule.fixed(3, at=2), reset="yes")


def test_saved_state_reads_the_one_key_and_every_older_layout():
    from loopscape.shift.controller import STATE_KEY, ShiftController, saved_state

    c = ShiftController(ShiftSchedule.fixed(3, at=1))
    c.before_step(2)
    state = c.state_dict()
    assert STATE_KEY == "shift_state"
    assert saved_state({STATE_KEY: state, "totals": {}}) == state
    assert saved_state({**state, "logs": {}}) is not None  # Markov trainer, Lightning: the state's keys themselves
    assert saved_state({**state, "logs": {}})["switches"] == state["switches"]
    assert saved_state({"schedule": state, "totals": {}}) == state  # the algorithmic trainer's
    assert saved_state({"schedules": [state], "generators": []}) == [state]  # the population's
    assert saved_state({"totals": {}}) is None
    for old in ({**state, "grad": {}}, {"schedule": state}):
        resumed = ShiftController(ShiftSchedule.fixed(3, at=1))
        resumed.load_state_dict(saved_state(old))
        assert resumed.switches == [(2, 3)] and resumed.state_dict() == state


def test_the_gradient_norm_scp_reads_is_named():
    from loopscape.shift.controller import ShiftController
    from loopscape.shift.criterion import GRAD_NORMS

    assert set(GRAD_NORMS) == {"full_batch", "step_mean", "last_logged"}
    c = ShiftController(ShiftSchedule.scp(3, ShiftCriterion(patience=5)), grad_norm="step_mean")
    assert c.state_dict()["grad_norm"] == "step_mean"
    c.after_evaluation(1, 1.0, 0.25)
    assert c.scp_progress()["scp_grad_norm"] == 0.25  # in the callbacks' logs as it happens
    assert "(the gradient norm SCP read, step_mean: the mean, over the optimiser steps" in c.end_of_training(10)
    with pytest.raises(ValueError, match="grad_norm must be None or one of"):
        ShiftController(ShiftSchedule.fixed(3, at=1), grad_norm="mean")


def test_markov_checkpoints_keep_the_controller_under_one_key_and_old_ones_resume(tmp_path):
    import json

    full = train_markov(fresh(), TASK, CFG, tmp_path / "full", seed=0, schedule=ShiftSchedule.scp(3, scp()))

    def crash_at_5(epoch):
        if epoch == 5:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_markov(
            fresh(), TASK, CFG, tmp_path / "cut", seed=0, schedule=ShiftSchedule.scp(3, scp()), on_epoch=crash_at_5
        )
    (path,) = (tmp_path / "cut").rglob("state.json")
    state = json.loads(path.read_text())
    assert set(state["extra"]) == {"shift_state", "logs"}
    assert state["extra"]["shift_state"]["grad_norm"] == "full_batch"
    assert state["extra"]["shift_state"]["schedule"]["shift_step"] == 3  # SCP fired before this checkpoint
    state["extra"] = {**state["extra"].pop("shift_state"), "logs": state["extra"]["logs"]}  # the layout before
    path.write_text(json.dumps(state))
    resumed = train_markov(
        fresh(), TASK, CFG, tmp_path / "cut", seed=0, schedule=ShiftSchedule.scp(3, scp()), resume=True
    )
    assert numbers(resumed) == numbers(full)


def test_the_shift_study_reads_every_scp_setting_shift_by_included():
    """The study's scp: is ShiftConfig's scp section (the algorithmic train.shift.scp:), no narrower copy."""
    from loopscape.config import ConfigError, load_config, preset_file
    from loopscape.experiments.reproduce import ReproduceConfig

    cfg = load_config(ReproduceConfig, [preset_file("reproduce-quick.yaml")], {"shift.scp.shift_by": 30})
    config = cfg.shift.shift_config("scp", "keep", 3)
    assert config == ShiftConfig(3, scp={"patience": 5, "wait": 3, "max_wait": 10, "shift_by": 30})
    assert config.scp is not cfg.shift.scp  # each policy builds from its own copy
    assert config.build().criterion == ShiftCriterion(patience=5, wait=3, max_wait=10, shift_by=30)
    assert load_config(ReproduceConfig, [preset_file("reproduce-quick.yaml")]).shift.scp.shift_by is None
    with pytest.raises(ConfigError, match=r"^shift\.scp\.shift_by must be None or an integer >= 1 \(got 0\)$"):
        load_config(ReproduceConfig, [], {"shift.scp.shift_by": 0})
    with pytest.raises(ConfigError, match=r"^shift\.scp\.patiense must be one of"):
        load_config(ReproduceConfig, [], {"shift.scp.patiense": 3})
