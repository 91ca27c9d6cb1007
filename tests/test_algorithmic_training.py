"""Training on the algorithmic tasks: resume, SHIFT's switch, the schedule, and DDP under torchrun."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loopscape.data.algorithmic import AlgorithmicTask, Curriculum
from loopscape.models.looped_gpt import looped_gpt
from loopscape.shift.schedule import ShiftConfig
from loopscape.training.algorithmic import (
    AlgorithmicTrainConfig,
    lr_at,
    make_optimizer,
    step_flops,
    train_algorithmic,
    train_step,
)

SMALL = dict(d_model=16, n_heads=2, n_layers=1)


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(s):
        if s == step:
            raise Crash

    return on_step


def _run(tmp, paradigm, steps, resume=False, on_step=None, **cfg):
    torch.manual_seed(0)
    task = AlgorithmicTask("parity")
    model = looped_gpt(task.vocab_size, **SMALL)
    cfg = {"eval_every": 5, **cfg}
    if "shift_at" in cfg:
        cfg["shift"] = ShiftConfig(at=cfg.pop("shift_at"))
    config = AlgorithmicTrainConfig(
        steps=steps, eval_size=32, checkpoint_every=10, curriculum_interval=3, batch_size=16, lr=1e-3, **cfg
    )
    rows = train_algorithmic(
        model, task, paradigm, config, Curriculum(6, 3), tmp, seed=3, resume=resume, on_step=on_step
    )
    return model, rows


def test_train_step_is_one_plain_adamw_step_on_the_masked_mean_loss():
    """The trainer's step (fused AdamW where torch has it) against the step written out:
    mean cross-entropy over scored positions, backward, clip to norm 1, torch's reference AdamW."""
    task = AlgorithmicTask("parity")
    batch = task.batch(torch.tensor([1, 3, 5, 2, 4]), torch.Generator().manual_seed(0))
    config = AlgorithmicTrainConfig(lr=1e-2, grad_clip=1e-3)  # the clip binds
    torch.manual_seed(0)
    ours, ref = looped_gpt(task.vocab_size, **SMALL), looped_gpt(task.vocab_size, **SMALL)
    ref.load_state_dict(ours.state_dict())
    loss_sum, correct, grad_norm = train_step(ours, make_optimizer(ours, config), batch, batch.n_loops, config)

    logits = ref(batch.inputs, batch.n_loops)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(
        batch.targets.shape
    )
    (nll * batch.mask).sum().div(batch.mask.sum()).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), config.grad_clip)
    torch.optim.AdamW(ref.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False).step()

    assert loss_sum.item() == pytest.approx((nll * batch.mask).sum().item(), rel=1e-6)
    assert grad_norm.item() == pytest.approx(norm.item(), rel=1e-6) and norm.item() > config.grad_clip
    assert correct.shape == (5,)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    full, rows_full = _run(tmp_path / "a", "looped", 30)
    with pytest.raises(Crash):
        _run(tmp_path / "b", "looped", 30, on_step=_crash_at(25))  # last checkpoint: step 20
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "partial": tru')  # a torn line from the crash
    resumed, rows = _run(tmp_path / "b", "looped", 30, resume=True)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]

    assert strip(rows) == strip(rows_full)


def test_resume_from_a_checkpoint_between_evaluations(tmp_path):
    """Checkpoints every 10 steps, evaluations every 5 and 15: the running means survive the crash."""
    _, rows_full = _run(tmp_path / "a", "single", 30, eval_every=15)
    with pytest.raises(Crash):
        _run(tmp_path / "b", "single", 30, eval_every=15, on_step=_crash_at(15))  # checkpoint at 10, mid-window
    _, rows = _run(tmp_path / "b", "single", 30, eval_every=15, resume=True)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]

    assert strip(rows) == strip(rows_full)


def test_single_reads_one_step_looped_reads_T_n(tmp_path):
    _, single = _run(tmp_path / "s", "single", 10)
    _, looped = _run(tmp_path / "l", "looped", 10)
    assert all(r["loops_per_sample"] == 1.0 for r in single)
    assert looped[-1]["loops_per_sample"] > 1.5  # lengths 1..k, T(n) = n
    assert looped[-1]["flops"] > single[-1]["flops"]


def test_shift_at_a_fixed_step_switches_and_keeps_going(tmp_path):
    _, rows = _run(tmp_path / "x", "shift", 20, shift_at=11)
    assert [r["paradigm"] for r in rows] == ["single", "single", "looped", "looped"]
    assert rows[-1]["shift_step"] == 11


def test_fixed_shift_step_is_the_last_single_attn_step(tmp_path):
    """One convention with the Markov trainer and SCP: shift_at = s trains steps 1..s as Single-Attn."""
    _, rows = _run(tmp_path / "x", "shift", 20, shift_at=10)
    assert [(r["step"], r["paradigm"], r.get("shift_step")) for r in rows] == [
        (5, "single", None),
        (10, "single", 10),
        (15, "looped", 10),
        (20, "looped", 10),
    ]
    assert rows[1]["loops_per_sample"] == 1.0 and rows[2]["loops_per_sample"] > 1.0


def test_checkpoints_count_steps(tmp_path):
    _run(tmp_path / "x", "single", 20)
    assert json.loads((tmp_path / "x" / "checkpoints" / "latest.json").read_text()) == {
        "unit": "step",
        "done": 20,
        "dir": "step-00020",
    }


def test_shift_by_scp_records_its_step(tmp_path):
    _, rows = _run(
        tmp_path / "x", "shift", 40, shift=ShiftConfig(scp=dict(patience=1, min_delta=10.0, wait=1, max_wait=1))
    )
    shifted = rows[-1]["shift_step"]
    assert shifted is not None and all(r["paradigm"] == ("single" if r["step"] <= shifted else "looped") for r in rows)


def test_flops_match_torch_flop_counter():
    """Training FLOPs / 3 = the forward that FlopCounterMode counts (math attention kernel, whose
    matmuls it sees), less the masked half of causal attention that our count leaves out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    task = AlgorithmicTask("copy")
    torch.manual_seed(0)
    model = looped_gpt(task.vocab_size, d_model=16, n_heads=2, n_layers=2)
    batch = task.batch(torch.tensor([3, 1, 2, 3]), torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch.inputs, batch.n_loops)  # per-sample steps: rows stop at their own T(n)
    W, d = batch.inputs.shape[1], 16
    masked = (
        int(batch.n_loops.sum()) * 2 * (4 * d * W * W - 2 * d * W * (W + 1))
    )  # full - causal, per row-step, 2 layers
    assert step_flops(model.config, batch, batch.n_loops) / 3 == counter.get_total_flops() - masked


def test_schedule_constant_then_cosine_to_zero():
    c = AlgorithmicTrainConfig(steps=100, lr=1.0)
    assert lr_at(10, c, 50) == 1.0 and lr_at(50, c, 50) == 1.0
    assert lr_at(75, c, 50) == pytest.approx(0.5) and lr_at(100, c, 50) == pytest.approx(0.0)


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """torchrun, gloo, 2 processes x 8 rows = one process x 16 rows: same weights to 1e-5."""
    args = (
        "algorithmic --task parity -p looped --steps 12 -q --set model.d_model=16 --set model.n_heads=2 "
        "--set train.batch_size=16 --set train.eval_every=6 --set train.curriculum_interval=3 --set train_max_len=5 "
        "--set test_lengths=[1,2] --set test_size=8 --set train.device=cpu --set workers=1"
    ).split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "loopscape.cli", *args, "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "loopscape.cli",
            *args,
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (
        load_file(str(tmp_path / "one/looped/model.safetensors")),
        load_file(str(tmp_path / "two/looped/model.safetensors")),
    )
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    ra = json.loads((tmp_path / "one/looped/metrics.jsonl").read_text().splitlines()[-1])
    rb = json.loads((tmp_path / "two/looped/metrics.jsonl").read_text().splitlines()[-1])
    assert ra["train_acc"] == rb["train_acc"] and ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)


def test_bf16_autocast_trains_and_logs_finite_numbers(tmp_path):
    _, rows = _run(tmp_path / "bf", "looped", 10, precision="bf16")
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    _, fp32 = _run(tmp_path / "fp", "looped", 10)
    # autocast really ran the products in bf16: the same run in fp32 gives other losses (ignored, they would match)
    assert [r["train_loss"] for r in rows] != [r["train_loss"] for r in fp32]


@pytest.mark.slow
def test_compiled_layers_match_eager(tmp_path):
    eager, _ = _run(tmp_path / "e", "looped", 5)
    compiled, _ = _run(tmp_path / "c", "looped", 5, compile=True)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


def test_curvature_probe_in_the_trainer_measures_the_training_loss_and_resumes(tmp_path):
    """SHIFT switching at step 6, probed every 4 steps: the probe's Hessian is that of the training loss on
    its rows at the paradigm's loop counts, and a run resumed after a crash measures what the whole run did."""
    from loopscape.landscape.hessian import HessianOperator
    from loopscape.landscape.linalg import dense_matrix
    from loopscape.training.algorithmic import ScoredRows, curvature_probe

    settings = {"curvature_every": 6, "curvature_rows": 8, "curvature_k": 2, "curvature_params": "model.ln_f.*"}
    model, _ = _run(tmp_path / "a", "shift", 12, shift_at=6, **settings)
    rows = [json.loads(line) for line in (tmp_path / "a" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12]
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < metrics[-1]["curvature_time_s"] and metrics[0]["curvature_time_s"] < metrics[-1]["curvature_time_s"]
    with pytest.raises(Crash):
        _run(tmp_path / "b", "shift", 12, shift_at=6, on_step=_crash_at(10), **settings)  # checkpoint at 10
    _run(tmp_path / "b", "shift", 12, shift_at=6, resume=True, **settings)
    again = [json.loads(line) for line in (tmp_path / "b" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [6, 12] and again[1]["mutual_information"] is not None
    for r, s in zip(rows, again):
        assert r["top_eigenvalues"] == pytest.approx(s["top_eigenvalues"], rel=1e-9)

    # the probe's loss is the trainer's masked mean loss on the probe rows, read after T(n) loops (Stage II)
    task = AlgorithmicTask("parity")
    val = task.batch(torch.randint(1, 6, (32,), generator=torch.Generator().manual_seed(1)), torch.Generator())
    config = AlgorithmicTrainConfig(eval_size=32, **{**settings, "curvature_params": None})
    probe, probe_rows = curvature_probe(val, config, None)
    wrapped = ScoredRows(model, probe_rows.n_loops).double()
    H = HessianOperator(wrapped, probe.batches, dtype=torch.float64, loss_fn=probe.operator_options["loss_fn"])
    logits = wrapped(probe_rows.inputs)
    expected = torch.nn.functional.cross_entropy(logits[probe_rows.mask], probe_rows.targets[probe_rows.mask])
    assert H.loss().item() == pytest.approx(expected.item(), rel=1e-12)
    assert dense_matrix(
        HessianOperator(
            wrapped,
            probe.batches,
            dtype=torch.float64,
            params="model.ln_f.*",
            loss_fn=probe.operator_options["loss_fn"],
        )
    ).shape == (32, 32)


def test_old_shift_settings_read_into_the_shift_section(tmp_path):
    """A run folder or --set line from before train.shift: shift_at and scp move into it, and a fixed switch
    drops scp as it always did; milestones are refused in one line (the looped stage is per-row T(n))."""
    from loopscape.config import ConfigError, from_dict

    old = from_dict(AlgorithmicTrainConfig, {"shift_at": 6, "scp": {"patience": 2}})
    assert old.shift == ShiftConfig(at=6)
    old = from_dict(AlgorithmicTrainConfig, {"shift_at": None, "scp": {"patience": 2, "wait": 1}})
    assert old.shift == ShiftConfig(scp={"patience": 2, "wait": 1})
    with pytest.raises(ConfigError, match=r"^train\.shift must be a fixed switch"):
        from_dict(AlgorithmicTrainConfig, {"shift": {"milestones": {3: 2}}}).validate("train.")
    with pytest.raises(
        ConfigError,
        match=r"^train\.shift: give at most one of at .* \(set train\.shift\.scp=null for a fixed switch\)$",
    ):
        from_dict(AlgorithmicTrainConfig, {"shift": {"at": 3, "scp": {}}}).validate("train.")


@pytest.mark.parametrize("preset", [None, "cpu-small"])
def test_train_scp_is_an_alias_of_train_shift_scp(preset):
    """The older spelling (docs/scripts/numbers_unchanged.sh passes it to old and new trees alike) gives the
    same config and the same schedule as the merged setting."""
    from loopscape.config import load_config, parse_override
    from loopscape.experiments.algorithmic import AlgorithmicStudyConfig, preset_files
    from loopscape.shift.criterion import SCPConfig, ShiftCriterion

    files = preset_files(preset, "parity") if preset else []
    old = load_config(
        AlgorithmicStudyConfig, files, dict([parse_override("train.scp={patience: 2, wait: 2, max_wait: 4}")])
    )
    new = load_config(
        AlgorithmicStudyConfig, files, dict([parse_override("train.shift.scp={patience: 2, wait: 2, max_wait: 4}")])
    )
    assert old == new and old.train.shift.scp == SCPConfig(patience=2, wait=2, max_wait=4)
    a, b = old.train.shift.build(), new.train.shift.build()
    assert a.config == b.config and a.criterion == b.criterion == ShiftCriterion(patience=2, wait=2, max_wait=4)
    one = load_config(AlgorithmicStudyConfig, [], {"train.scp.patience": 7})  # one setting by its older name
    assert one.train.shift == load_config(AlgorithmicStudyConfig, [], {"train.shift.scp.patience": 7}).train.shift


def test_train_shift_n_loops_is_refused_in_one_line():
    """The looped stage runs each row's T(n): a loop count for SHIFT's Stage II would be read by nothing."""
    from loopscape.config import ConfigError, load_config
    from loopscape.experiments.algorithmic import AlgorithmicStudyConfig

    with pytest.raises(ConfigError) as error:
        load_config(AlgorithmicStudyConfig, [], {"train.shift.n_loops": 4})
    assert str(error.value) == (
        "train.shift.n_loops is not used by the algorithmic study: its loop count is T(n) per row (got 4; leave it out)"
    )
    assert load_config(AlgorithmicStudyConfig, [], {}).train.shift.n_loops == 2  # the default, as run folders hold


def test_checkpoints_keep_the_controller_under_one_key_and_old_ones_resume(tmp_path):
    """SCP fires at step 15 (the third evaluation); the checkpoint at 20 holds shift_state, naming the mean step
    norm SCP read; rewritten to the older "schedule" key it resumes to the same numbers."""
    shift = ShiftConfig(scp=dict(patience=1, min_delta=10.0, wait=1, max_wait=1))
    _, rows_full = _run(tmp_path / "a", "shift", 30, shift=shift)
    assert rows_full[-1]["shift_step"] == 15
    with pytest.raises(Crash):
        _run(tmp_path / "b", "shift", 30, shift=shift, on_step=_crash_at(25))
    (path,) = (tmp_path / "b").rglob("state.json")
    state = json.loads(path.read_text())
    assert "shift_state" in state["extra"] and "schedule" not in state["extra"]
    assert state["extra"]["shift_state"]["grad_norm"] == "step_mean"
    state["extra"]["schedule"] = state["extra"].pop("shift_state")  # the layout before
    path.write_text(json.dumps(state))
    _, rows = _run(tmp_path / "b", "shift", 30, shift=shift, resume=True)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]

    assert strip(rows) == strip(rows_full)


def test_a_run_folder_written_before_scp_was_typed_resumes(tmp_path):
    """Older config.yaml files hold train.shift.scp as the settings given (three keys, no shift_by): the same
    settings, so the folder resumes; the config written now holds every SCP setting and reads back equal."""
    import yaml

    from loopscape.config import from_dict, to_dict
    from loopscape.experiments.algorithmic import AlgorithmicStudyConfig, algorithmic_preset
    from loopscape.io import same_config

    config = algorithmic_preset("cpu-small", "parity")
    assert set(to_dict(config)["train"]["shift"]["scp"]) == {
        "patience",
        "min_delta",
        "wait",
        "grad_tol",
        "max_wait",
        "shift_by",
    }
    old = to_dict(config)
    old["train"]["shift"]["scp"] = {"patience": 5, "wait": 3, "max_wait": 10}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert same_config(tmp_path / "config.yaml", config)
    old["train"]["shift"]["scp"]["patience"] = 6
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert not same_config(tmp_path / "config.yaml", config)
    assert from_dict(AlgorithmicStudyConfig, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
