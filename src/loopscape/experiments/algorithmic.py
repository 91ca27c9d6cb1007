"""Appendix E.2: Single-Attn, Looped-Attn and SHIFT on one algorithmic task.

``run_algorithmic(config, out)`` trains the chosen paradigms (each in
``out/<paradigm>/``, resumable), scores every trained model at the test
lengths (Figure 14 c-panels: Looped-Attn read by adaptive stopping, per batch
and per sample, and by the oracle ``T(n)``; Single-Attn after its one step),
accounts SHIFT's compute against Looped-Attn's (Figure 11), and writes
``results.json``, figures and ``report.html``. ``run_algorithmic_seeds`` does so
once per seed and reports over the seeds.

Presets (``PRESETS``) are YAML files, one per task, in
``loopscape/configs/algorithmic/<preset>/``: ``paper`` is Appendix E.2 on a
GPU as the seed paper runs it (50,001 steps); ``authors`` is ``paper`` for the
100,001 steps of Fan et al.'s configs (``configs/algorithmic/authors.yaml`` on
top); ``cpu-small`` trains each paradigm in minutes on 2 CPU cores and is a
smoke-scale look, not the paper's numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loopscape.config import (
    ConfigError,
    from_dict,
    load_config,
    preset_file,
    require,
    require_fits,
    require_seeds,
    to_dict,
    validate_tree,
)
from loopscape.data.algorithmic import ROW_WIDTHS, TASKS, AlgorithmicTask, Curriculum
from loopscape.experiments.parallel import epoch_progress, run_jobs
from loopscape.io import (
    claim_new_run_folder,
    lock_run_folder,
    prepare_run_folder,
    read_json_file,
    read_jsonl,
    write_json,
)
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig, adaptive_choice, exact_match, oracle_decode
from loopscape.reporting.algorithmic import (
    algorithmic_section,
    seeds_summary,
    write_algorithmic_report,
    write_seeds_report,
)
from loopscape.reporting.html import StudyReport
from loopscape.shift.schedule import recorded_switch
from loopscape.training.algorithmic import PARADIGMS, AlgorithmicTrainConfig, resolve_device, train_algorithmic
from loopscape.training.checkpoint import load_weights
from loopscape.training.distributed import init_distributed

# extra steps allowed to adaptive stopping past T(n) (spec: n+20, n+30 for Unique Set, n1*n2+30 for Multiplication)
EXTRA_LOOPS = {"unique_set": 30, "multiplication": 30}
PRESETS = ("cpu-small", "paper", "authors")


@dataclass
class AlgorithmicStudyConfig:
    """One task's study. ``model`` is the looped GPT's own config; ``vocab_size`` comes from the task."""

    task: str = "parity"
    paradigms: list[str] = field(default_factory=lambda: list(PARADIGMS))
    seed: int = 0
    train_max_len: int = 20
    test_lengths: list[int] = field(default_factory=lambda: list(range(1, 41)))
    test_size: int = 256
    row_width: str = "task"  # the authors' fixed width per task, or "batch": the widest row (AlgorithmicTask)
    model: LoopedGPTConfig = field(default_factory=LoopedGPTConfig)
    train: AlgorithmicTrainConfig = field(default_factory=AlgorithmicTrainConfig)
    workers: int = 0  # processes for the paradigms on CPU (0: one per core, at most one per paradigm)
    # the Hessian split by loop pairs of each looped final model (landscape.loops) over this block's weights
    # (a name pattern; exact, so about a thousand weights: "model.layers.0.attn.proj.*" takes ~3 min on 2 CPU
    # cores at cpu-small), on 8 fixed rows of the training lengths; null: off
    loop_coupling_params: str | None = None

    def validate(self, p: str = "") -> None:
        require(self.task in TASKS, f"{p}task", f"one of {TASKS}", self.task)
        require(
            bool(self.paradigms) and all(x in PARADIGMS for x in self.paradigms),
            f"{p}paradigms",
            f"a non-empty list from {PARADIGMS}",
            self.paradigms,
        )
        require(self.train_max_len >= 1, f"{p}train_max_len", "an integer >= 1", self.train_max_len)
        require(
            bool(self.test_lengths) and min(self.test_lengths) >= 1,
            f"{p}test_lengths",
            "a non-empty list of integers >= 1",
            self.test_lengths,
        )
        require(self.test_size >= 1, f"{p}test_size", "an integer >= 1", self.test_size)
        require(self.row_width in ROW_WIDTHS, f"{p}row_width", f"one of {ROW_WIDTHS}", self.row_width)
        # activations kept for the backward pass, fp32: about 16 tensors of (batch, width, d_model) per layer
        # and loop; rows are at most 4 x (the longest training length + 1) wide, and loop T(n) <= n^2 times
        width, loops = 4 * self.train_max_len + 4, self.train_max_len ** (2 if self.task == "multiplication" else 1)
        size = 4 * 16 * self.train.batch_size * width * self.model.d_model * self.model.n_layers * loops
        require_fits(size, f"{p}train.batch_size", self.train.batch_size, "one training step's activations")
        require(
            self.model.vocab_size is None, f"{p}model.vocab_size", "null (the task decides it)", self.model.vocab_size
        )

    @property
    def curriculum(self) -> Curriculum:
        return Curriculum(self.train_max_len, self.train.curriculum_interval)


def preset_files(name: str, task: str) -> list[Path]:
    """The YAML files of a preset for a task, read in order (``authors``: ``paper``'s, then its own)."""
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS} (got {name!r})")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS} (got {task!r})")
    if name == "authors":
        return [preset_file("algorithmic", "paper", f"{task}.yaml"), preset_file("algorithmic", "authors.yaml")]
    return [preset_file("algorithmic", name, f"{task}.yaml")]


def algorithmic_preset(name: str, task: str, steps: int | None = None) -> AlgorithmicStudyConfig:
    """A preset's config for a task (``steps`` overrides its training steps)."""
    return load_config(AlgorithmicStudyConfig, preset_files(name, task), {"train.steps": steps} if steps else None)


def build(config: AlgorithmicStudyConfig, device: torch.device) -> tuple[AlgorithmicTask, LoopedGPT]:
    """The task and the model with the task's vocabulary, initialised from ``config.seed``."""
    task = AlgorithmicTask(config.task, config.row_width)
    torch.manual_seed(config.seed)
    return task, LoopedGPT(replace(config.model, vocab_size=task.vocab_size)).to(device)


def max_loops(task: AlgorithmicTask, n: int) -> int:
    """Adaptive stopping's step budget at test length ``n`` (spec)."""
    t = int(task.n_loops(torch.tensor([n]), torch.tensor([2]))[0])
    return t + EXTRA_LOOPS.get(task.name, 20)


@torch.no_grad()
def length_accuracy(
    model: LoopedGPT, task: AlgorithmicTask, paradigm: str, lengths: list[int], size: int, seed: int, batch: int = 128
) -> dict[str, list[float]]:
    """Exact-match accuracy per test length (Figure 14 c-panels).

    Looped models (Looped-Attn, SHIFT): ``adaptive`` (one stop per batch, the
    authors' rule), ``adaptive_per_sample`` and ``oracle`` (exactly ``T(n)``);
    Single-Attn: ``single`` (one step).
    """
    model.eval()
    device = next(model.parameters()).device
    keys = ["single"] if paradigm == "single" else ["adaptive", "adaptive_per_sample", "oracle", "chosen_loops"]
    out = {k: [] for k in keys}
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(seed * 1000 + n)
        data = task.test_batch(n, size, g, device)
        acc = {k: [] for k in keys}
        for s in range(0, size, batch):
            rows = slice(s, s + batch)
            x, y, m, st = data.inputs[rows], data.targets[rows], data.mask[rows], data.n_loops[rows]
            if paradigm == "single":
                acc["single"].append(exact_match(oracle_decode(model, x, torch.ones_like(st)), y, m))
                continue
            every = model.all_loops(x, max(max_loops(task, n), int(st.max())))  # one pass serves all three readings
            pred, chosen = adaptive_choice(every, m)
            acc["adaptive"].append(exact_match(pred, y, m))
            acc["chosen_loops"].append(chosen.float())
            acc["adaptive_per_sample"].append(exact_match(adaptive_choice(every, m, per_sample=True)[0], y, m))
            acc["oracle"].append(exact_match(every[st - 1, torch.arange(len(st), device=device)].argmax(-1), y, m))
        for k in keys:
            out[k].append(torch.cat(acc[k]).float().mean().item())
    return out


def _train_job(config_dict: dict, paradigm: str, run_dir: str, resume: bool, progress_q) -> str:
    if progress_q is not None:  # a worker process of its own: one thread, as the cores are shared out
        torch.set_num_threads(1)
    config = from_dict(AlgorithmicStudyConfig, config_dict)
    device = resolve_device(config.train.device)
    task, model = build(config, device)
    on_step = epoch_progress(run_dir, resume, progress_q)  # checkpoints count steps as their 'epoch'
    train_algorithmic(
        model,
        task,
        paradigm,
        config.train,
        config.curriculum,
        run_dir,
        seed=config.seed,
        resume=resume,
        on_step=on_step,
    )
    return run_dir


def shift_saving(shift_rows: list[dict], looped_rows: list[dict]) -> dict:
    """SHIFT's compute against Looped-Attn's over the same number of steps (Figure 11)."""
    s, lp = shift_rows[-1], looped_rows[-1]
    shifted = next((s for s in map(recorded_switch, shift_rows) if s is not None), None)
    return {
        "shift_step": shifted,
        "flops_ratio": lp["flops"] / s["flops"],
        "time_ratio": lp["time_s"] / s["time_s"],
        "final_val_acc": {"shift": s["val_acc"], "looped": lp["val_acc"]},
    }


def final_coupling(model: LoopedGPT, task: AlgorithmicTask, config: AlgorithmicStudyConfig, rows: int = 8) -> dict:
    """The loss Hessian over ``config.loop_coupling_params`` split by loop pairs (:mod:`loopscape.landscape.loops`)
    on ``rows`` fixed rows of the training lengths, each read at its own ``T(n)``: cross-loop shares and the valley
    shapes of the tied Hessian against its diagonal blocks (:func:`~loopscape.landscape.loops.loop_coupling`)."""
    from loopscape.landscape.loops import loop_coupling, loop_hessian
    from loopscape.training.algorithmic import ScoredRows, scored_rows_loss

    g = torch.Generator().manual_seed(config.seed * 1000 + 17)
    b = task.batch(torch.randint(1, config.train_max_len + 1, (rows,), generator=g), g)
    device = next(model.parameters()).device
    targets = torch.where(b.mask, b.targets, -100).to(device)
    model.eval()
    lh = loop_hessian(
        ScoredRows(model, b.n_loops.to(device)),
        [(b.inputs.to(device), targets)],
        params=config.loop_coupling_params,
        loss_fn=scored_rows_loss,
    )
    return loop_coupling(lh)


def run_algorithmic(
    config: AlgorithmicStudyConfig, out: str | Path, resume: bool = False, show_progress: bool = True
) -> dict:
    """Train, score and report; returns ``results.json``'s content (rank 0) or ``{}`` (other ranks)."""
    validate_tree(config)
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        rank = init_distributed(config.train.device)
    if rank == 0:
        prepare_run_folder(
            out, config, resume
        )  # config.yaml; an existing folder only with --resume and the same settings
    jobs = [(to_dict(config), p, str(out / p), resume) for p in config.paradigms]
    if world > 1:  # under torchrun: every rank trains each paradigm in turn, data-parallel
        torch.distributed.barrier()
        for job in jobs:
            _train_job(*job, None)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return {}
    else:
        workers = (
            1
            if resolve_device(config.train.device).type == "cuda"
            else config.workers or min(os.cpu_count() or 1, len(jobs))
        )
        run_jobs(
            _train_job,
            jobs,
            [config.train.steps] * len(jobs),
            f"{config.task}: training {', '.join(config.paradigms)}",
            workers=workers,
            show_progress=show_progress,
            folder=out,
        )
    device = resolve_device(config.train.device)
    results = {"task": config.task, "config": to_dict(config), "paradigms": {}}
    metrics = {p: read_jsonl(out / p / "metrics.jsonl") for p in config.paradigms}
    for p in config.paradigms:
        task, model = build(config, device)
        load_weights(out / p / "model.safetensors", model)
        # a SHIFT run whose switch never came is Single-Attn: it is scored as one, with a note
        never = p == "shift" and all(recorded_switch(r) is None for r in metrics[p])
        scored_as = "single" if never else p
        results["paradigms"][p] = {
            "params": model.num_params(),
            "final": metrics[p][-1],
            "scored_as": scored_as,
            "length_accuracy": length_accuracy(
                model, task, scored_as, config.test_lengths, config.test_size, config.seed
            ),
        }
        if scored_as != "single" and config.loop_coupling_params is not None:
            results["paradigms"][p]["loop_coupling"] = final_coupling(model, task, config)
    if "shift" in config.paradigms and "looped" in config.paradigms:
        results["shift_saving"] = shift_saving(metrics["shift"], metrics["looped"])
    results["test_lengths"] = config.test_lengths
    write_json(out / "results.json", results)
    write_algorithmic_report(out, results)
    return results


def run_algorithmic_study(
    config: AlgorithmicStudyConfig, out: str | Path, resume: bool = False, show_progress: bool = True
) -> StudyReport:
    """:func:`run_algorithmic` as a section of a larger report."""
    results = run_algorithmic(config, out, resume=resume, show_progress=show_progress)
    section, verdicts = algorithmic_section(Path(out), results, anchor=f"algorithmic-{config.task}")
    return StudyReport(results, verdicts, section)


def run_algorithmic_seeds(
    config: AlgorithmicStudyConfig, seeds: list[int], out: str | Path, resume: bool = False, show_progress: bool = True
) -> dict:
    """:func:`run_algorithmic` once per seed, in ``out/seed-<k>/``, then the summary over
    seeds (``seeds.json``, ``report.html``). With ``resume``, finished seeds are read
    back, an interrupted one continues and the rest start."""
    require_seeds(seeds, "seeds")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "seeds: one seed per torchrun launch (give --seed); a list of seeds runs in one process, one after another"
        )
    out = Path(out)
    if resume:
        lock_run_folder(out)  # the one writer of the seeds folder too, not only of each seed's: refused if held
    else:
        claim_new_run_folder(out)
    runs = {}
    for s in seeds:
        run_dir = out / f"seed-{s}"
        if resume and (run_dir / "results.json").exists():
            runs[s] = read_json_file(run_dir / "results.json")
            if runs[s]["config"] != to_dict(replace(config, seed=s)):
                raise ConfigError(
                    f"--resume: the configuration differs from the one in {str(run_dir / 'results.json')!r}; resume "
                    "with the same settings"
                )
        else:
            runs[s] = run_algorithmic(
                replace(config, seed=s),
                run_dir,
                resume=resume and (run_dir / "config.yaml").exists(),
                show_progress=show_progress,
            )
    summary = seeds_summary(runs)
    write_json(out / "seeds.json", summary)
    write_seeds_report(out, runs, summary)
    return summary
