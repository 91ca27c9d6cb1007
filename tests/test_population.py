"""The population trainer against the single-model trainer, its Adam, and resume."""

import json

import pytest
import torch

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import single_attn
from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.population import MemberAdam, Population, load_member, train_population
from loopscape.training.run import seeded

TASK = build_task(MarkovDataConfig(n_train=120, n_val=60))[1]
CFG = MarkovTrainConfig(epochs=8, batch_size=16, checkpoint_every=3)


def fresh(seed):
    with seeded(seed):
        return single_attn(max_len=3)


def scp():
    return ShiftCriterion(patience=1, min_delta=10.0, wait=1, grad_tol=10.0)  # plateau at 1, shift at 2


SPECS = [
    (0, lambda: ShiftSchedule.fixed(3, at=0)),
    (1, lambda: ShiftSchedule.fixed(3, at=4)),
    (1, lambda: ShiftSchedule.fixed(3, at=4, optimizer="reset")),
    (2, lambda: ShiftSchedule.scp(3, scp())),
    (3, lambda: ShiftSchedule.sampled_depth(3, at=2, seed=5)),  # a fresh draw every epoch of Stage II
]


def test_every_member_follows_its_single_model_run(tmp_path):
    rows = train_population(
        [fresh(s) for s, _ in SPECS], [s for s, _ in SPECS], [c() for _, c in SPECS], TASK, CFG, tmp_path / "pop"
    )
    for k, (seed, make) in enumerate(SPECS):
        ref = train_markov(fresh(seed), TASK, CFG, tmp_path / f"ref{k}", seed=seed, schedule=make())
        assert [r["n_loops"] for r in ref] == [r["n_loops"][k] for r in rows]
        for key in ("train_loss", "val_loss", "grad_norm", "acc_all", "acc_high"):
            got = torch.tensor([r[key][k] for r in rows])
            want = torch.tensor([r[key] for r in ref])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_member_adam_is_adam_per_member_and_resets_one_member():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 5)
    grads = [torch.randn(3, 4, 5) for _ in range(6)]
    stacked = torch.nn.Parameter(w.clone())
    ours = MemberAdam([stacked], lr=0.01)
    singles = [torch.nn.Parameter(w[k].clone()) for k in range(3)]
    refs = [torch.optim.Adam([p], lr=0.01) for p in singles]
    for i, g in enumerate(grads):
        if i == 3:
            ours.reset(1)
            refs[1].state.clear()
        stacked.grad = g.clone()
        ours.step()
        for k in range(3):
            singles[k].grad = g[k].clone()
            refs[k].step()
    for k in range(3):
        torch.testing.assert_close(stacked.data[k], singles[k].data, rtol=1e-6, atol=1e-7)


def train_specs(run_dir, **kwargs):
    """Every member of SPECS, freshly built, trained as one population."""
    models, seeds, schedules = [fresh(s) for s, _ in SPECS], [s for s, _ in SPECS], [c() for _, c in SPECS]
    return train_population(models, seeds, schedules, TASK, CFG, run_dir, **kwargs)


def crashed_at_epoch_5(run_dir) -> None:
    """A population run killed at epoch 5 (its last checkpoint stays)."""

    def crash(epoch):
        if epoch == 5:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_specs(run_dir, on_epoch=crash)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_resume_equals_uninterrupted(tmp_path):
    full = train_specs(tmp_path / "full")
    crashed_at_epoch_5(tmp_path / "cut")
    assert without_time(train_specs(tmp_path / "cut", resume=True)) == without_time(full)


def test_saved_member_is_the_members_model(tmp_path):
    controllers = [c() for _, c in SPECS]
    train_population([fresh(s) for s, _ in SPECS], [s for s, _ in SPECS], controllers, TASK, CFG, tmp_path / "pop")
    template = fresh(0)
    template.n_loops = 3
    pop = Population(template, [fresh(s) for s, _ in SPECS])
    from safetensors.torch import load_file

    pop.load_state_dict(load_file(str(tmp_path / "pop" / "model.safetensors")))
    loops = torch.tensor([3 if c.shift_step is not None else 1 for c in controllers])
    for k in range(len(SPECS)):
        m = load_member(tmp_path / "pop" / "model.safetensors", template, k, int(loops[k]))
        torch.testing.assert_close(m(TASK.val.inputs), pop(TASK.val.inputs, loops)[k], rtol=1e-5, atol=1e-6)


def test_a_resumed_population_records_each_switch_once(tmp_path):
    """The next epoch's stage is applied before each checkpoint; resumed, it is not applied (recorded, reset) again."""
    from loopscape.shift.controller import ShiftController

    cfg = MarkovTrainConfig(epochs=8, batch_size=16, checkpoint_every=4)
    schedule = ShiftSchedule.fixed(3, at=4, optimizer="reset")
    whole = train_population([fresh(1)], [1], [schedule], TASK, cfg, tmp_path / "a")
    cut = MarkovTrainConfig(epochs=4, batch_size=16, checkpoint_every=4)
    train_population([fresh(1)], [1], [ShiftSchedule.fixed(3, at=4, optimizer="reset")], TASK, cut, tmp_path / "b")
    (state,) = [json.loads(p.read_text()) for p in (tmp_path / "b").rglob("state.json")]
    extra = state["extra"]
    assert extra["shift_state"][0]["switches"] == [[5, 3]] and extra["shift_state"][0]["applied"] == 5
    resumed = ShiftController(ShiftSchedule.fixed(3, at=4, optimizer="reset"))
    resumed.load_state_dict(extra["shift_state"][0])
    assert resumed.switches == [(5, 3)]
    assert [r["n_loops"] for r in whole] == [[1]] * 5 + [[3]] * 4


def test_checkpoints_keep_the_controllers_under_one_key_and_old_ones_resume(tmp_path):
    """One list under shift_state (each naming the full-batch norm SCP read); a checkpoint that kept it under
    "schedules" resumes to the same numbers."""
    full = train_specs(tmp_path / "full")
    crashed_at_epoch_5(tmp_path / "cut")
    (path,) = (tmp_path / "cut").rglob("state.json")
    state = json.loads(path.read_text())
    assert set(state["extra"]) == {"generators", "shift_state", "logs"}
    assert [s["grad_norm"] for s in state["extra"]["shift_state"]] == ["full_batch"] * len(SPECS)
    state["extra"]["schedules"] = state["extra"].pop("shift_state")  # the layout before
    path.write_text(json.dumps(state))
    assert without_time(train_specs(tmp_path / "cut", resume=True)) == without_time(full)


def test_a_member_resets_only_its_own_moments_through_reset(tmp_path, monkeypatch):
    """The population's controllers get reset= (member k's moments), no stand-in optimiser."""
    cfg = MarkovTrainConfig(epochs=3, batch_size=16, checkpoint_every=100)
    schedules = [ShiftSchedule.fixed(3, at=2, optimizer="reset"), ShiftSchedule.fixed(3, at=2)]
    calls = []
    original = MemberAdam.reset

    def spy(self, member):
        calls.append(member)
        original(self, member)

    monkeypatch.setattr(MemberAdam, "reset", spy)
    train_population([fresh(1), fresh(1)], [1, 1], schedules, TASK, cfg, tmp_path / "pop")
    assert calls == [0]  # member 0 at its switch (epoch 3), once; member 1 keeps its moments
