import pytest
import torch
from safetensors.torch import load_file

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.models.linear_attn import looped_attn
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.run import seeded

TASK = build_task(MarkovDataConfig(n_train=120, n_val=60))[1]
CFG = MarkovTrainConfig(epochs=8, batch_size=16, checkpoint_every=3)


def numbers(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def fresh_model(seed=0):
    with seeded(seed):
        return looped_attn(n_loops=3, max_len=3)


def test_metrics_rows_and_content(tmp_path):
    rows = train_markov(fresh_model(), TASK, CFG, tmp_path, seed=0)
    assert [r["epoch"] for r in rows] == list(range(9))
    assert set(rows[0]) >= {"train_loss", "val_loss", "acc_all", "acc_low", "acc_high", "val_acc", "grad_norm"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "model.safetensors").exists()


def test_same_seed_same_numbers(tmp_path):
    a = train_markov(fresh_model(), TASK, CFG, tmp_path / "a", seed=0)
    b = train_markov(fresh_model(), TASK, CFG, tmp_path / "b", seed=0)
    c = train_markov(fresh_model(), TASK, CFG, tmp_path / "c", seed=1)
    assert numbers(a) == numbers(b)
    assert numbers(a) != numbers(c)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    full = train_markov(fresh_model(), TASK, CFG, tmp_path / "full", seed=0)

    class Crash(Exception):
        pass

    def crash_at_7(epoch):
        if epoch == 7:  # last checkpoint at 6; epoch 7 was logged and must be redone
            raise Crash

    with pytest.raises(Crash):
        train_markov(fresh_model(), TASK, CFG, tmp_path / "cut", seed=0, on_epoch=crash_at_7)
    resumed = train_markov(fresh_model(seed=99), TASK, CFG, tmp_path / "cut", seed=0, resume=True)
    assert numbers(resumed) == numbers(full)
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_norm_matches_autograd(tmp_path):
    import torch.nn.functional as F

    from loopscape.training.markov import evaluate

    m = fresh_model()
    loss = F.cross_entropy(m(TASK.train.inputs), TASK.train.targets)
    loss.backward()
    expected = torch.sqrt(sum((p.grad**2).sum() for p in m.parameters())).item()
    m.zero_grad(set_to_none=True)
    assert evaluate(m, TASK)["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is None for p in m.parameters())


def test_training_accuracy_never_exceeds_bayes_ceiling(tmp_path):
    # No predictor of x_L from x_<L can beat the per-input majority on the whole
    # training set. (Per IC group it is no bound: a model may trade low-IC for high-IC.)
    from loopscape.data.markov import bayes_ceiling

    ok = bayes_ceiling(TASK.train).float()
    rows = train_markov(
        fresh_model(), TASK, MarkovTrainConfig(epochs=15, batch_size=16, checkpoint_every=100), tmp_path, seed=0
    )
    for r in rows:
        assert r["acc_all"] <= ok.mean().item() + 1e-9


def test_hessian_tracker_resumes_with_the_run(tmp_path):
    from loopscape.io import read_jsonl
    from loopscape.landscape.tracking import HessianTracker

    def tracker():
        return [HessianTracker(TASK.train.inputs, TASK.train.targets, 3, every=2)]

    train_markov(fresh_model(), TASK, CFG, tmp_path / "full", seed=0, trackers=tracker())

    def crash_at_7(epoch):
        if epoch == 7:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_markov(fresh_model(), TASK, CFG, tmp_path / "cut", seed=0, on_epoch=crash_at_7, trackers=tracker())
    train_markov(fresh_model(), TASK, CFG, tmp_path / "cut", seed=0, resume=True, trackers=tracker())
    full, cut = read_jsonl(tmp_path / "full" / "spectra.jsonl"), read_jsonl(tmp_path / "cut" / "spectra.jsonl")
    assert [r["epoch"] for r in full] == [0, 2, 4, 6, 8]
    assert full == cut
