"""SHIFT where users train: the HF Trainer and Lightning callbacks, and a plain loop (ShiftController)."""

import json

import pytest
import torch

from loopscape.looped.decoder import get_n_loops, loopify
from loopscape.models.linear_attn import looped_attn
from loopscape.shift.controller import ShiftController
from loopscape.shift.schedule import ShiftSchedule

transformers = pytest.importorskip("transformers")
V = 30


def tiny_gpt2():
    torch.manual_seed(0)
    # no dropout: Lightning does not restore the random state on resume (the HF Trainer does)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=3, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return loopify(transformers.GPT2LMHeadModel(config), layers=(1, 2), n_loops=1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.x = torch.randint(0, V, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def hf_trainer(out, callback, max_steps=12, save_steps=100):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(16, 1), callbacks=[callback]
    )


def test_hf_callback_switches_after_the_fixed_step_and_logs_it(tmp_path):
    from loopscape.integrations.hf import ShiftCallback

    trainer = hf_trainer(tmp_path, ShiftCallback(n_loops=3, at=5))
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["n_loops"] for r in rows] == [1] * 5 + [3] * 7  # steps 1..5 Single, 6..12 looped
    assert all(r["shift_step"] == 5 for r in rows) and get_n_loops(trainer.model) == 3


def test_hf_callback_resumed_across_the_switch_is_the_same_run(tmp_path):
    from loopscape.integrations.hf import ShiftCallback

    settings = {"n_loops": 2, "scp": {"patience": 1, "min_delta": 10.0, "wait": 1, "max_wait": 1}}
    whole = hf_trainer(tmp_path / "a", ShiftCallback(**settings))
    whole.train()
    shift = whole.state.log_history[-2]["shift_step"]
    assert 2 <= shift < 12  # SCP fired on an evaluation (every 2 steps)
    cut = hf_trainer(tmp_path / "b", ShiftCallback(**settings), save_steps=2)
    cut.train()
    resumed = hf_trainer(tmp_path / "b", ShiftCallback(**settings), save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{shift + 2}"))  # after the switch
    assert resumed.state.log_history[-2]["shift_step"] == shift
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q)
    state = json.loads((tmp_path / "b" / f"checkpoint-{shift + 2}" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["ShiftCallback"]["attributes"]["shift_state"]
    assert saved["schedule"]["shift_step"] == shift
    assert saved["grad_norm"] == "last_logged"  # the norm SCP read: the Trainer's last logged grad_norm


def test_plain_loop_resets_the_optimizer_only_when_asked():
    model = looped_attn(n_loops=1, max_len=3)
    params = list(model.parameters())
    for reset in ("keep", "reset"):
        opt = torch.optim.AdamW(params, lr=1e-2)
        shift = ShiftController(ShiftSchedule.fixed(3, at=2, optimizer=reset), model, opt)
        for step in range(1, 5):
            k = shift.before_step(step)
            assert k == (1 if step <= 2 else 3) and model.n_loops == k
            had_state = bool(opt.state)
            model(torch.randint(0, 3, (4, 3))).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 3:
                assert had_state == (reset == "keep")
        assert shift.switches == [(3, 3)]


def test_a_model_with_nothing_to_loop_and_scp_without_numbers_are_one_line():
    with pytest.raises(ValueError, match="has nothing to loop"):
        ShiftController(ShiftSchedule.fixed(2, at=1), torch.nn.Linear(2, 2))
    from loopscape.shift.criterion import ShiftCriterion

    shift = ShiftController(ShiftSchedule.scp(2, ShiftCriterion()), looped_attn(n_loops=1, max_len=3))
    with pytest.raises(ValueError, match=r"SCP needs a validation loss and a gradient norm .*grad_norm=None"):
        shift.after_evaluation(10, 0.5, None)


def lightning_run(out, callback, max_steps=12, resume=None, every=None, after_validation=False):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2()
            self.loops_seen = []

        def training_step(self, batch, i):
            self.loops_seen.append(get_n_loops(self.model))
            return self.model(**batch).loss

        def validation_step(self, batch, i):
            self.log("val_loss", self.model(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    L.seed_everything(0, verbose=False)
    module = Module()
    if after_validation:  # written at each validation's end, after SCP has seen it
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, save_on_train_epoch_end=False)
    else:
        ckpt = (
            L.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=every, save_top_k=-1)
            if every
            else None
        )
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[callback] + ([ckpt] if ckpt else []),
        accelerator="cpu",
        logger=L.pytorch.loggers.TensorBoardLogger(out, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every or after_validation),
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(Tokens(8, 0), batch_size=4)  # 2 steps an epoch: even steps end one
    val = torch.utils.data.DataLoader(Tokens(16, 1), batch_size=8)
    trainer.fit(module, loader, val, ckpt_path=resume)
    return module, trainer


def test_lightning_callback_switches_saves_its_state_and_resumes_across_the_switch(tmp_path):
    from loopscape.integrations.lightning import ShiftCallback

    module, trainer = lightning_run(tmp_path / "fixed", ShiftCallback(n_loops=3, at=5))
    assert module.loops_seen == [1] * 5 + [3] * 7
    assert trainer.callback_metrics["n_loops"] == 3 and trainer.callback_metrics["shift_step"] == 5
    assert list((tmp_path / "fixed" / "tb").rglob("events.out.tfevents.*"))  # TensorBoard event files

    settings = {"n_loops": 2, "scp": {"patience": 1, "min_delta": 10.0, "wait": 1, "max_wait": 1}}
    whole, _ = lightning_run(tmp_path / "a", ShiftCallback(**settings))
    shift = whole.loops_seen.index(2)  # steps 1..shift were Single
    assert 2 <= shift < 12
    lightning_run(tmp_path / "b", ShiftCallback(**settings), after_validation=True)
    saved = sorted((tmp_path / "b").glob(f"*step={shift + 2}.ckpt"))  # an epoch's end: the loader starts afresh
    assert len(saved) == 1 and torch.load(saved[0], weights_only=True)["callbacks"]
    state = next(v for k, v in torch.load(saved[0], weights_only=True)["callbacks"].items() if "ShiftCallback" in k)
    assert set(state) == {"shift_state", "step_grad_norms"} and state["shift_state"]["grad_norm"] == "step_mean"
    resumed, _ = lightning_run(tmp_path / "c", ShiftCallback(**settings), resume=str(saved[0]))
    assert resumed.loops_seen == [2] * (12 - shift - 2)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)


def test_lightning_callback_reads_the_state_layout_before_shift_state():
    """Checkpoints written before shift_state kept the controller's keys beside "grad"."""
    pytest.importorskip("lightning")
    from loopscape.integrations.lightning import ShiftCallback

    settings = {"n_loops": 2, "scp": {"patience": 1, "min_delta": 10.0, "wait": 1, "max_wait": 1}}
    before = ShiftCallback(**settings)
    for step in (2, 4, 6):
        before.controller.after_evaluation(step, 1.0, 1.0)
    before.controller.before_step(7)
    new = before.state_dict()
    old = {**new["shift_state"], "grad": {"sum": 3.0, "n": 2}}
    for state, grads in ((new, {"sum": 0.0, "n": 0}), (old, {"sum": 3.0, "n": 2})):
        after = ShiftCallback(**settings)
        after.load_state_dict(state)
        assert after.controller.schedule.shift_step == 6 and after.controller.switches == [(7, 2)]
        assert after._grad == grads


def test_lightning_scp_refuses_step_checkpoints_that_precede_validation(tmp_path):
    """Lightning writes a step checkpoint before that step's validation and does not rerun it on resume: a run
    resumed from step 4 switched at 16 instead of 10. Refused in one line before any step is trained."""
    from loopscape.integrations.lightning import ShiftCallback

    settings = {"n_loops": 2, "scp": {"patience": 1, "min_delta": 10.0, "wait": 1, "max_wait": 1}}
    with pytest.raises(ValueError, match=r"cannot resume exactly from ModelCheckpoint\(every_n_train_steps=2\)"):
        lightning_run(tmp_path / "a", ShiftCallback(**settings), every=2)
    module, _ = lightning_run(tmp_path / "b", ShiftCallback(n_loops=2, at=3), every=2)  # a fixed step needs no eval
    assert module.loops_seen == [1] * 3 + [2] * 9


def test_resumed_after_validation_checkpoints_scp_switches_where_the_whole_run_did(tmp_path):
    """Killed after any checkpoint and resumed, SCP switches at the uninterrupted run's step."""
    from loopscape.integrations.lightning import ShiftCallback

    settings = {"n_loops": 2, "scp": {"patience": 2, "min_delta": 10.0, "wait": 1, "max_wait": 1}}
    whole, _ = lightning_run(tmp_path / "a", ShiftCallback(**settings))
    shift = whole.loops_seen.index(2)
    lightning_run(tmp_path / "b", ShiftCallback(**settings), after_validation=True)
    for ckpt in sorted((tmp_path / "b").glob("*.ckpt")):
        step = int(ckpt.stem.split("step=")[1])
        if step >= shift:
            continue
        resumed, _ = lightning_run(tmp_path / f"c{step}", ShiftCallback(**settings), resume=str(ckpt))
        assert resumed.loops_seen.index(2) + step == shift, ckpt.name


def test_the_controller_applies_a_step_once():
    """The HF Trainer announces the first step twice (on_train_begin, on_step_begin): with at=0 the switch was
    recorded twice and the optimiser reset twice."""
    model = looped_attn(n_loops=1, max_len=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    shift = ShiftController(ShiftSchedule.fixed(3, at=0, optimizer="reset"), model, opt)
    assert shift.before_step(1) == 3 and shift.before_step(1) == 3
    assert shift.switches == [(1, 3)]


def test_hf_callback_resumed_at_the_switch_step_records_it_once(tmp_path):
    from loopscape.integrations.hf import ShiftCallback

    at_zero = ShiftCallback(n_loops=3, at=0)
    hf_trainer(tmp_path, at_zero).train()
    assert at_zero.controller.switches == [(1, 3)]
    cut = hf_trainer(tmp_path / "b", ShiftCallback(n_loops=3, at=8), save_steps=8)
    cut.train()
    resumed_cb = ShiftCallback(n_loops=3, at=8)
    resumed = hf_trainer(tmp_path / "b", resumed_cb, save_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-8"))  # the next step is the switch
    assert resumed_cb.controller.switches == [(9, 3)]


def test_callback_settings_that_contradict_or_cannot_work_are_one_line(tmp_path):
    from loopscape.integrations.hf import ShiftCallback

    with pytest.raises(ValueError, match="give at most one of at .*got at and scp"):
        ShiftCallback(n_loops=3, at=5, scp={"patience": 2})
    trainer = hf_trainer(tmp_path, ShiftCallback(n_loops=3))
    trainer.args.eval_strategy = "no"
    with pytest.raises(ValueError, match=r"eval_strategy='no'\) never evaluates"):
        trainer.train()


def test_lightning_scp_names_a_misspelled_monitor(tmp_path):
    from loopscape.integrations.lightning import ShiftCallback

    with pytest.raises(ValueError, match=r"monitor='val_los'.*logged no 'val_los'.*logged: .*val_loss"):
        lightning_run(tmp_path, ShiftCallback(n_loops=2, monitor="val_los"))


def test_scp_that_never_fires_says_why_at_the_end(tmp_path):
    from loopscape.integrations.hf import ShiftCallback
    from loopscape.shift.criterion import ShiftCriterion

    never = ShiftCallback(n_loops=3, scp={"patience": 100})
    trainer = hf_trainer(tmp_path / "a", never)
    with pytest.warns(UserWarning, match=r"Stage II never started .*no plateau in 6 evaluations"):
        trainer.train()
    seen = [r["scp_evaluations"] for r in trainer.state.log_history if "loss" in r]
    # in the logs as it happens: HF logs a step before evaluating it, and evaluates every 2 steps
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    bounded = ShiftCallback(n_loops=3, scp={"patience": 100, "shift_by": 2})
    trainer = hf_trainer(tmp_path / "b", bounded)
    trainer.train()
    assert bounded.controller.schedule.shift_step == 4  # the second evaluation (every 2 steps)
    assert bounded.controller.schedule.criterion.forced
    assert "no evaluation" in ShiftCriterion().status()


def _rank_switches(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from loopscape.shift.criterion import ShiftCriterion

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = looped_attn(n_loops=1, max_len=3)
    shift = ShiftController(ShiftSchedule.scp(3, ShiftCriterion(patience=2, wait=1, max_wait=1)), model)
    loops = []
    for step in range(1, 21):
        loops.append(shift.before_step(step))
        if step % 2 == 0:  # rank 1 sees a loss that keeps improving: alone, it would never shift
            shift.after_evaluation(step, 1.0 if rank == 0 else 1.0 / step, 1.0)
    torch.save(loops, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_switches_at_rank_0s_step(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_switches, args=(port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0 == rank1 and 1 in rank0 and 3 in rank0  # the same switch step on both ranks


def test_hf_callback_writes_its_scalars_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loopscape.integrations.hf import ShiftCallback

    trainer = hf_trainer(tmp_path, ShiftCallback(n_loops=2, at=3), max_steps=6)
    trainer.args.report_to = ["tensorboard"]
    trainer.train()
    (events,) = (tmp_path / "runs" / "loopscape").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    loops = {e.step: e.value for e in acc.Scalars("loopscape/n_loops")}
    assert loops[3] == 1 and loops[4] == 2 and loops[6] == 2


def test_loopscape_trainers_mirror_metrics_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from loopscape.cli import app

    out = tmp_path / "m"
    args = f"markov -o {out} -q --epochs 3 --seeds 0 --set hessian.enabled=false --set train.tensorboard=true"
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    run = out / "runs" / "looped_attn" / "seed0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train_loss")}
    assert logged == pytest.approx({r["epoch"]: r["train_loss"] for r in rows})


def test_a_missing_extra_is_one_line_naming_it():
    import subprocess
    import sys

    code = "import sys; sys.modules['transformers'] = None; import loopscape.integrations.hf"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "ImportError: loopscape's hf integration needs the 'transformers' package: pip install 'loopscape[hf]'"
    )


def test_retrofit_runs_three_arms_and_counts_the_looped_layers_once_per_loop(tmp_path):
    from typer.testing import CliRunner

    from loopscape.cli import app
    from loopscape.data.algorithmic import AlgorithmicTask
    from loopscape.experiments.retrofit import RetrofitConfig, TaskData, build_decoder, step_flops

    cfg = RetrofitConfig(d_model=16, n_layers=3, n_heads=2, loop_layers=[1, 2])
    model = build_decoder(cfg, TaskData(cfg), 0)
    batch = AlgorithmicTask("parity").batch(torch.tensor([2, 3]), torch.Generator().manual_seed(0))
    plain = step_flops(model, batch.inputs)
    layer = sum(p.numel() for p in model.model.layers[1].parameters())
    loopify(model, layers=(1, 2), n_loops=3)
    assert step_flops(model, batch.inputs) - plain == 6 * batch.inputs.numel() * 2 * layer  # two more passes

    out = tmp_path / "rf"
    args = (
        f"retrofit -o {out} -q --seeds 0,1 --set d_model=16 --set n_heads=2 --set n_layers=3 --set loop_layers=[1,2] "
        "--set stage1_steps=6 --set stage2_steps=6 --set test_lengths=[1,2,3,4,5] --set train_max_len=3 "
        "--set test_size=16 --set curriculum_interval=2"
    )
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    report = json.loads((out / "retrofit.json").read_text())
    for run in report["runs"].values():
        assert run["plain"]["flops"] < run["shift"]["flops"] < run["scratch"]["flops"]
        assert set(run["shift"]["per_length"]) == {"1", "2", "3", "4", "5"}
        assert run["shift"]["readings"][-1] == [run["shift"]["flops"], run["shift"]["past"]]  # read at the end too
        reached = run["shift_flops_to_scratch_final"]
        assert reached is None or reached in [f for f, _ in run["shift"]["readings"]]
    assert report["verdicts"][0]["verdict"] in ("holds", "fails")
    # each arm is saved; the loop sweep on the saved SHIFT arm and the study's test rows (seed 0's) reads
    # the study's own exact match at the trained loop count
    assert sorted(p.name for p in (out / "models" / "seed1").iterdir()) == ["plain", "scratch", "shift"]
    sweep = CliRunner().invoke(
        app,
        f"loop-sweep --model {out / 'models/seed0/shift'} --data {out / 'sweep-data.jsonl'} --loops 1,3 "
        f"-o {tmp_path / 'sweep'}".split(),
    )
    assert sweep.exit_code == 0, sweep.output
    at_three = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["counts"][1]
    per_length = report["runs"]["0"]["shift"]["per_length"].values()
    rows = [json.loads(line) for line in (out / "sweep-data.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 16 and at_three["tokens"] == sum(t != -100 for r in rows for t in r["labels"])
    assert 100 * at_three["exact_match"] == pytest.approx(sum(per_length) / 5, abs=1e-9)
    assert "Retrofit (Appendix B)" in (out / "report.html").read_text()
    bad = CliRunner().invoke(app, ["retrofit", "-o", str(tmp_path / "x"), "--set", "loop_layers=[2,9]"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith("error: loop_layers must be [start, stop] with 0 <= start")


def test_retrofit_splits_the_looped_models_hessian_by_loop_pairs(tmp_path):
    from typer.testing import CliRunner

    from loopscape.cli import app
    from loopscape.experiments.retrofit import RetrofitConfig, TaskData, build_decoder, final_coupling
    from loopscape.landscape import hessian_operator
    from loopscape.landscape.linalg import dense_matrix

    tiny = (
        "--set d_model=16 --set n_heads=2 --set n_layers=3 --set loop_layers=[1,2] --set stage1_steps=4 "
        "--set stage2_steps=4 --set test_lengths=[1,2,3,4] --set train_max_len=3 --set test_size=8"
    )
    out = tmp_path / "rf"
    pattern = "model.layers.1.input_layernorm.weight"
    args = f"retrofit -o {out} -q --seeds 0 {tiny} --set loop_coupling_params={pattern}"
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    report = json.loads((out / "retrofit.json").read_text())
    for arm in ("shift", "scratch"):
        (row,) = report["loop_coupling"][arm]["seeds"]
        assert (row["seed"], row["n_loops"], row["params"]) == (0, 3, 16) and row["verdict"] in (
            "holds",
            "partly",
            "fails",
        )
        assert report["loop_coupling"][arm]["verdict"] == row["verdict"]
    claims = [v["claim"] for v in report["verdicts"]]
    assert claims[-2:] == ["Retrofit: the V-valley comes from cross-loop coupling (1 seeds)"] * 2
    assert (
        "## The Hessian split by loop pairs (over `model.layers.1.input_layernorm.weight`)"
        in (out / "retrofit.md").read_text()
    )
    # the split's full() is the plain Hessian of the same rows: its top eigenvalue, by an independent path
    cfg = RetrofitConfig(
        d_model=16, n_heads=2, n_layers=3, loop_layers=[1, 2], train_max_len=3, loop_coupling_params=pattern
    )
    data = TaskData(cfg)
    model = loopify(build_decoder(cfg, data, 0), layers=(1, 2), n_loops=3)
    split = final_coupling(model, data, cfg, seed=0)
    plain = hessian_operator(model, data.coupling_batches(0), params=pattern, dtype=torch.float64)
    # (to 1e-6: Llama's RMSNorm computes in float32 whatever the model's type)
    assert split["top"]["full"][0] == pytest.approx(torch.linalg.eigvalsh(dense_matrix(plain))[-1].item(), rel=1e-6)
    # a pattern of weights outside the loop is refused in one line, before any run folder
    bad = CliRunner().invoke(
        app, f"retrofit -o {tmp_path / 'x'} -q {tiny} --set loop_coupling_params=model.norm.*".split()
    )
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()
    assert bad.output.strip().splitlines()[-1] == (
        "error: loop_coupling_params must be a name pattern of looped weights only, e.g. "
        "'model.layers.1.self_attn.q_proj.weight' (got 'model.norm.*')"
    )


def test_retrofit_refuses_a_split_too_big_to_be_dense_before_training(monkeypatch):
    import loopscape.config
    from loopscape.config import ConfigError
    from loopscape.experiments.retrofit import RetrofitConfig, TaskData, check_coupling_params

    cfg = RetrofitConfig(d_model=16, n_heads=2, n_layers=3, loop_layers=[1, 2], loop_coupling_params="model.layers.1.*")
    check_coupling_params(cfg, TaskData(cfg))  # fits this machine
    monkeypatch.setattr(loopscape.config, "machine_memory", lambda: 2**20)  # a machine of 1 MiB
    with pytest.raises(ConfigError, match=r"^loop_coupling_params must be small enough to fit in memory \(a dense "):
        check_coupling_params(cfg, TaskData(cfg))


def test_sampled_depth_draws_the_same_counts_everywhere_and_switches_once():
    a = ShiftSchedule.sampled_depth(4, at=10, seed=3)
    b = ShiftSchedule.sampled_depth(4, at=10, seed=3)
    counts = [a.n_loops_at(s) for s in range(1, 400)]
    assert counts[:10] == [1] * 10 and counts == [b.n_loops_at(s) for s in range(1, 400)]
    assert set(counts[10:]) == {1, 2, 3, 4}  # uniform on 1..n_loops after the switch
    assert abs(sum(counts[10:]) / len(counts[10:]) - 2.5) < 0.2
    assert counts != [ShiftSchedule.sampled_depth(4, at=10, seed=4).n_loops_at(s) for s in range(1, 400)]
    shift = ShiftController(a, looped_attn(n_loops=1, max_len=3))
    for step in range(1, 60):
        assert shift.before_step(step) == counts[step - 1]
    assert shift.switches == [(11, counts[10])]  # one stage change, not one per draw
    with pytest.raises(ValueError, match="a depth distribution or curriculum goes with a fixed switch point"):
        ShiftSchedule(3, milestones={5: 2}, depth="uniform")


def test_retrofit_on_a_local_text_file(tmp_path):
    from typer.testing import CliRunner

    from loopscape.cli import app

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "rf"
    args = (
        f"retrofit -o {out} -q --seeds 0 --data {text} --set d_model=16 --set n_heads=2 --set n_layers=3 "
        "--set loop_layers=[1,2] --set stage1_steps=5 --set stage2_steps=5 --set text_context=16 --set test_size=8"
    )
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    run = json.loads((out / "retrofit.json").read_text())["runs"]["0"]
    assert set(run["shift"]["per_length"]) == {"16", "32"} and 0 <= run["shift"]["past"] <= 100
    assert "next-character accuracy" in (out / "retrofit.md").read_text()
    short = tmp_path / "short.txt"
    short.write_text("abc", encoding="utf-8")
    bad = CliRunner().invoke(app, ["retrofit", "-o", str(tmp_path / "x"), "--data", str(short)])
    assert bad.exit_code == 2 and "data_path must hold at least" in bad.output


def probe_batches():
    x = Tokens(4, 7).x
    return [{"input_ids": x, "labels": x}]


def test_hf_curvature_callback_tracks_logs_plots_and_resumes(tmp_path):
    from loopscape.integrations.hf import CurvatureCallback

    settings = {"every": 3, "k": 2, "params": "transformer.h.2.ln_1.*", "n_probes": 2, "n_steps": 6}
    whole = hf_trainer(tmp_path / "a", CurvatureCallback(probe_batches(), **settings), max_steps=6)
    whole.train()
    rows = [json.loads(line) for line in (tmp_path / "a" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["mutual_information"] is None
    assert all(len(r["top_eigenvalues"]) == 2 and r["top_eigenvalues"][0] >= r["top_eigenvalues"][1] for r in rows)
    assert all(
        r["mutual_information"] <= min(r["matrix_entropy"], p["matrix_entropy"]) + 1e-12 for p, r in zip(rows, rows[1:])
    )  # I(H_s; H_s+1) <= min(E_s, E_s+1)
    assert (tmp_path / "a" / "curvature" / "curvature.png").stat().st_size > 0
    assert [h["step"] for h in whole.state.log_history if "curvature/trace" in h] == [3, 6]
    cut = hf_trainer(tmp_path / "b", CurvatureCallback(probe_batches(), **settings), max_steps=6, save_steps=3)
    cut.train()
    resumed = hf_trainer(tmp_path / "b", CurvatureCallback(probe_batches(), **settings), max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    again = [json.loads(line) for line in (tmp_path / "b" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [3, 6]
    for r, s in zip(rows, again):  # the resumed run measures what the uninterrupted one measured
        assert r["top_eigenvalues"] == pytest.approx(s["top_eigenvalues"], rel=1e-6)
        assert r["matrix_entropy"] == pytest.approx(s["matrix_entropy"], rel=1e-6)
        assert (r["mutual_information"] is None) == (s["mutual_information"] is None)


def test_hf_curvature_state_lives_in_the_checkpoint_it_resumes_from(tmp_path):
    """(a) The process dies after HF wrote checkpoint-3 but before the callbacks' on_save; (b) the run resumes
    from that checkpoint into a new output_dir. Either way the resumed run measures what the whole run did."""
    from loopscape.integrations.hf import CurvatureCallback

    class DieOnSave(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("killed after the checkpoint was written")

    settings = {"every": 3, "k": 2, "params": "transformer.h.2.ln_1.*", "n_probes": 2, "n_steps": 6}
    whole = hf_trainer(tmp_path / "a", CurvatureCallback(probe_batches(), **settings), max_steps=6)
    whole.train()
    rows = [json.loads(line) for line in (tmp_path / "a" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    cut = hf_trainer(tmp_path / "b", CurvatureCallback(probe_batches(), **settings), max_steps=6, save_steps=3)
    cut.callback_handler.callbacks.insert(0, DieOnSave())  # before ours: our on_save never runs
    with pytest.raises(RuntimeError, match="killed after the checkpoint"):
        cut.train()
    resumed = hf_trainer(tmp_path / "c", CurvatureCallback(probe_batches(), **settings), max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))  # a new output_dir
    again = [json.loads(line) for line in (tmp_path / "c" / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [3, 6]  # the row measured before the kill is carried over
    assert again[1]["mutual_information"] is not None  # the probe's last spectrum came back with it
    assert again[1]["mutual_information"] == pytest.approx(rows[1]["mutual_information"], rel=1e-6)


def test_lightning_curvature_callback_logs_and_saves_its_state(tmp_path):
    from loopscape.integrations.lightning import CurvatureCallback

    callback = CurvatureCallback(
        probe_batches(),
        every=4,
        k=2,
        params="transformer.h.2.*",
        folder=tmp_path / "curv",
        module="model",
        n_probes=2,
        n_steps=8,
    )
    module, trainer = lightning_run(tmp_path / "run", callback, max_steps=8, every=4)
    assert [r["step"] for r in callback.probe.rows] == [4, 8]
    assert "curvature/lambda_1" in trainer.callback_metrics
    # TensorBoard holds the curvature at the measured steps only, each once (not repeated at later log steps)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "run" / "tb").iterdir()))).Reload()
    steps = [e.step for e in events.Scalars("curvature/lambda_1")]
    assert steps == [4, 8], steps
    assert [e.value for e in events.Scalars("curvature/trace")] == pytest.approx(
        [r["trace"] for r in callback.probe.rows]
    )
    saved = torch.load(sorted((tmp_path / "run").glob("*step=8.ckpt"))[0], weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "CurvatureCallback" in k)
    assert [r["step"] for r in state["rows"]] == [4, 8] and (tmp_path / "curv" / "curvature.png").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loopify_refuses_a_base_model_without_an_lm_head(family):
    if family == "gpt2":
        base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=8, n_layer=2, n_head=2))
    else:
        config = transformers.LlamaConfig(
            vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2
        )
        base = transformers.LlamaModel(config)
    with pytest.raises(ValueError, match=f"; {type(base).__name__} has no output embeddings \\(a base model\\?\\)$"):
        loopify(base, layers=(0, 1))


def test_hf_callbacks_resume_from_a_checkpoint_written_without_their_state(tmp_path):
    """A checkpoint of an earlier loopscape (or of a run without the callback) has no stateful_callbacks entry for
    it: the Trainer's next save raised KeyError. The older curvature_probe.json is still read."""
    from loopscape.integrations.hf import CurvatureCallback, ShiftCallback

    settings = {"every": 3, "k": 2, "params": "transformer.h.2.ln_1.*", "n_probes": 2, "n_steps": 6}
    cut = hf_trainer(tmp_path, CurvatureCallback(probe_batches(), **settings), max_steps=6, save_steps=3)
    cut.train()
    ckpt = tmp_path / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    probe_state = state["stateful_callbacks"].pop("CurvatureCallback")["attributes"]["probe_state"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "curvature_probe.json").write_text(json.dumps(probe_state))  # where earlier versions kept it
    callbacks = [CurvatureCallback(probe_batches(), **settings), ShiftCallback(n_loops=2, at=4)]
    resumed = hf_trainer(tmp_path, callbacks[0], max_steps=6, save_steps=3)
    resumed.add_callback(callbacks[1])
    resumed.train(resume_from_checkpoint=str(ckpt))
    rows = [json.loads(line) for line in (tmp_path / "curvature" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and rows[1]["mutual_information"] is not None
    with pytest.raises(ValueError, match="CurvatureCallback needs probe_batches"):
        hf_trainer(tmp_path / "x", CurvatureCallback(), max_steps=2).train()


def test_a_wrapper_with_its_own_n_loops_does_not_hide_the_looped_layers():
    from loopscape.looped import find_looped

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n_loops = 4  # a hyperparameter of the wrapper, not the model's loop count
            self.model = tiny_gpt2()

    wrapped = Wrapper()
    assert type(find_looped(wrapped)).__name__ == "LoopedRange"
    ShiftController(ShiftSchedule.fixed(3, at=0), wrapped).before_step(1)
    assert get_n_loops(wrapped.model) == 3 and wrapped.n_loops == 4


def test_retrofit_variant_arms_train_score_and_save(tmp_path):
    from typer.testing import CliRunner

    import loopscape
    from loopscape.cli import app

    out = tmp_path / "rf"
    arms = "[plain,shift,scratch,shift-plnorm,shift-k1,shift-k2,shift-concat,shift-lora]"
    args = (
        f"retrofit -o {out} -q --seeds 0,1 --set d_model=16 --set n_heads=2 --set n_layers=3 --set loop_layers=[1,2] "
        "--set stage1_steps=4 --set stage2_steps=4 --set test_lengths=[1,2,3,4] --set train_max_len=3 "
        f"--set test_size=8 --set curriculum_interval=2 --set lora_rank=2 --set arms={arms}"
    )
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code == 0, result.output
    report = json.loads((out / "retrofit.json").read_text())
    run = report["runs"]["0"]
    # the same forward FLOPs, a backward through fewer loops
    assert run["shift-k1"]["flops"] < run["shift-k2"]["flops"] < run["shift"]["flops"]
    assert run["shift-concat"]["flops"] > run["shift"]["flops"] and run["shift-lora"]["flops"] > run["shift"]["flops"]
    assert len(report["verdicts"]) == 6 and "(shift-lora: per-loop LoRA)" in report["verdicts"][-1]["claim"]
    assert "Verdict, shift-k1:" in (out / "retrofit.md").read_text()
    for arm, key, value in [
        ("shift-plnorm", "n_loops", 3),
        ("shift-lora", "loop_lora", 2),
        ("shift-k1", "backprop_loops", 1),
    ]:
        model = loopscape.from_pretrained(out / "models" / "seed0" / arm)
        assert model.config.loopscape[key] == value
    bad = CliRunner().invoke(app, ["retrofit", "-o", str(tmp_path / "x"), "--set", "arms=[plain,shift]"])
    assert bad.exit_code == 2 and "arms" in bad.output and "each once" in bad.output


def test_hf_curvature_rows_are_printed_and_a_run_too_short_to_measure_says_so(tmp_path, capsys, caplog):
    from loopscape.integrations.hf import CurvatureCallback

    settings = {"every": 3, "k": 2, "params": "transformer.h.2.ln_1.*", "n_probes": 2, "n_steps": 6}
    hf_trainer(tmp_path / "a", CurvatureCallback(probe_batches(), **settings), max_steps=3).train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "curvature/trace" in line]
    assert len(printed) == 1 and "'step': 3" in printed[0]
    with caplog.at_level("WARNING", logger="loopscape.integrations.hf"):
        hf_trainer(tmp_path / "b", CurvatureCallback(probe_batches(), **settings | {"every": 50}), max_steps=2).train()
    assert "CurvatureCallback measures every 50 steps and this run has 2: nothing will be measured" in caplog.text
    assert not (tmp_path / "b" / "curvature" / "curvature.jsonl").exists()


def test_retrofit_training_stops_on_divergence_in_one_line_and_takes_its_clip_from_the_config(tmp_path):
    from typer.testing import CliRunner

    from loopscape.cli import app

    tiny = (
        "--seeds 0 --set d_model=16 --set n_heads=2 --set n_layers=3 --set loop_layers=[1,2] --set stage1_steps=30 "
        "--set stage2_steps=2 --set test_lengths=[1,2,3,4] --set train_max_len=3 --set test_size=8"
    )
    result = CliRunner().invoke(app, f"retrofit -o {tmp_path / 'a'} -q {tiny} --set lr=1e12 --set clip=null".split())
    assert result.exit_code == 1, result.output
    assert "training diverged: retrofit step" in result.output and "lr (or clip) too large" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, f"retrofit -o {tmp_path / 'b'} -q {tiny} --set clip=0".split())
    assert result.exit_code == 2 and "clip must be null (no clip) or a number > 0 (got 0.0)" in result.output


def test_a_loop_of_ones_own_that_keeps_only_a_count_is_driven_too():
    """The controller prefers the loop protocol, and falls back on an n_loops attribute; nothing to loop is
    one line."""

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n_loops, self.cell = 1, torch.nn.Linear(2, 2)

    model = Counted()
    ShiftController(ShiftSchedule.fixed(3, at=2), model).before_step(3)
    assert model.n_loops == 3
    with pytest.raises(ValueError, match="Linear has nothing to loop"):
        ShiftController(ShiftSchedule.fixed(3, at=2), torch.nn.Linear(2, 2))
