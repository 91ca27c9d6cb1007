"""The sample-level study of Section 4.1 (Observation 1; Figures 3a, 3b).

Trains Single-Attn and Looped-Attn on one Markov language over several seeds
(the seed drives initialisation and batch order; the language and training
set are fixed by ``data.seed``) and writes a run folder::

    OUT/config.yaml                   the resolved configuration
    OUT/data.json                     transition matrices, IC statistics, Bayes ceilings
    OUT/runs/<model>/seed<k>/         metrics.jsonl, checkpoints/, model.safetensors
    OUT/figures/fig3a_ic_distribution.png, fig3b_accuracy.png
    OUT/summary.md, OUT/summary.json  table beside the paper's numbers, verdict
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from loopscape.config import ConfigError, require, to_dict
from loopscape.data.markov import MarkovLanguage, bayes_ceiling
from loopscape.experiments.parallel import epoch_progress, run_jobs
from loopscape.io import atomic_write_text, read_jsonl, write_json
from loopscape.landscape.tracking import HessianTracker, load_spectra
from loopscape.models.linear_attn import EMBEDDINGS, POSITIONS, LinearAttn, LinearAttnConfig
from loopscape.training.trainer import MarkovTask, TrainConfig, seeded, train


@dataclass
class MarkovDataConfig:
    """The Markov language and its data sets (Appendix E.1.1, E.1.3)."""

    vocab_size: int = 3
    length: int = 4
    n_train: int = 500
    n_val: int = 500
    alpha: float = 2.0
    seed: int = 0
    include_all: bool = True  # training set = every sequence once + tilted draws (E.1.1)
    test_lengths: list[int] = field(default_factory=lambda: [8, 11, 14, 17])
    n_test: int = 5000

    def validate(self, p: str = "") -> None:
        require(self.vocab_size >= 2, f"{p}vocab_size", "an integer >= 2", self.vocab_size)
        require(self.length >= 2, f"{p}length", "an integer >= 2", self.length)
        require(self.n_train >= 1, f"{p}n_train", "an integer >= 1", self.n_train)
        require(self.n_val >= 1, f"{p}n_val", "an integer >= 1", self.n_val)
        require(self.alpha > 0, f"{p}alpha", "a number > 0", self.alpha)
        require(self.n_test >= 1, f"{p}n_test", "an integer >= 1", self.n_test)
        for L in self.test_lengths:
            require(L >= self.length, f"{p}test_lengths", f"lengths >= the training length {self.length}", L)


@dataclass
class ToyModelConfig:
    """The toy models; Single-Attn uses ``n_loops = 1``, Looped-Attn ``n_loops``."""

    embedding: str = "onehot"
    d_model: int = 16
    max_len: int = 3  # the training input length: no position slot that training never reaches
    positions: str = "cyclic"  # longer test inputs reuse the codes with the transitions' period (Appendix E.1.3)
    init_scale: float = 1.0
    n_loops: int = 3

    def validate(self, p: str = "") -> None:
        require(self.embedding in EMBEDDINGS, f"{p}embedding", f"one of {list(EMBEDDINGS)}", self.embedding)
        require(self.d_model >= 1, f"{p}d_model", "an integer >= 1", self.d_model)
        require(self.max_len >= 1, f"{p}max_len", "an integer >= 1", self.max_len)
        require(self.positions in POSITIONS, f"{p}positions", f"one of {list(POSITIONS)}", self.positions)
        require(self.init_scale > 0, f"{p}init_scale", "a number > 0", self.init_scale)
        require(self.n_loops >= 1, f"{p}n_loops", "an integer >= 1 (T)", self.n_loops)

    def build(self, vocab_size: int, n_loops: int) -> LinearAttn:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return LinearAttn(LinearAttnConfig(vocab_size=vocab_size, **{**fields, "n_loops": n_loops}))


@dataclass
class HessianStudyConfig:
    """Hessian tracking (Observation 2): exact spectra every ``every`` epochs for the first ``n_seeds`` seeds."""

    enabled: bool = True
    every: int = 1
    n_seeds: int = 1
    n_bins: int = 50

    def validate(self, p: str = "") -> None:
        require(self.every >= 1, f"{p}every", "an integer >= 1", self.every)
        require(self.n_seeds >= 1, f"{p}n_seeds", "an integer >= 1", self.n_seeds)
        require(self.n_bins >= 2, f"{p}n_bins", "an integer >= 2", self.n_bins)


@dataclass
class MarkovStudyConfig:
    data: MarkovDataConfig = field(default_factory=MarkovDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hessian: HessianStudyConfig = field(default_factory=HessianStudyConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    workers: int = 0  # 0: one per core, at most one per run

    def validate(self, p: str = "") -> None:
        require(len(self.seeds) >= 1, f"{p}seeds", "a non-empty list of integers", self.seeds)
        require(len(set(self.seeds)) == len(self.seeds), f"{p}seeds", "distinct integers", self.seeds)
        require(self.workers >= 0, f"{p}workers", "an integer >= 0", self.workers)
        require(
            self.model.max_len >= self.data.length - 1,
            f"{p}model.max_len",
            f"an integer >= {self.data.length - 1} (the training input length, data.length - 1)",
            self.model.max_len,
        )

    @property
    def hessian_seeds(self) -> list[int]:
        return self.seeds[: self.hessian.n_seeds] if self.hessian.enabled else []

    @property
    def models(self) -> dict[str, int]:
        """Model name -> loop count T."""
        return {"single_attn": 1, "looped_attn": self.model.n_loops}


def build_task(data: MarkovDataConfig) -> tuple[MarkovLanguage, MarkovTask]:
    """The language, its training set (with IC groups) and a validation set.

    The validation set is ``n_val`` fresh tilted draws at the training length,
    from the same generator after the training set (the paper does not say
    what it validates on; SCP in Section 5 needs a validation loss).
    """
    lang = MarkovLanguage(data.vocab_size, data.length, seed=data.seed)
    rng = np.random.default_rng(data.seed)
    train_set = lang.training_set(data.n_train, data.alpha, rng, include_all=data.include_all)
    val_set = lang.sample_set(data.n_val, data.alpha, data.length, rng)
    low, high = train_set.ic_groups()
    return lang, MarkovTask(train_set, val_set, low, high)


def data_summary(lang: MarkovLanguage, task: MarkovTask) -> dict:
    ic = task.train.ic
    ok = bayes_ceiling(task.train).float()
    return {
        "transitions": lang.transitions.tolist(),
        "ic_unit": "bits",
        "n_train": len(task.train),
        "ic_max": ic.max().item(),
        "ic_low_max": ic[task.low].max().item(),
        "ic_high_min": ic[task.high].min().item(),
        "ic_train": ic.tolist(),
        "bayes_ceiling": {"all": ok.mean().item(), "low": ok[task.low].mean().item(), "high": ok[task.high].mean().item()},
    }


# -- running ------------------------------------------------------------------------


def _run_one(cfg: MarkovStudyConfig, name: str, seed: int, run_dir: str, resume: bool, progress_q=None) -> str:
    """Train one (model, seed); top-level so worker processes can run it."""
    if progress_q is not None:
        torch.set_num_threads(1)  # one core per worker: tiny matrices gain nothing from threads
    _, task = build_task(cfg.data)
    with seeded(seed):
        model = cfg.model.build(cfg.data.vocab_size, cfg.models[name])
    trackers = [HessianTracker(task.train.inputs, task.train.targets, cfg.hessian.every)] if seed in cfg.hessian_seeds else []
    train(model, task, cfg.train, run_dir, seed=seed, resume=resume, on_epoch=epoch_progress(run_dir, resume, progress_q), trackers=trackers)
    write_json(Path(run_dir) / "done.json", {"epochs": cfg.train.epochs})
    return run_dir


def run_dir_of(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def refuse_to_overwrite(out: Path) -> None:
    """A run never writes into a non-empty folder unless it resumes it."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {str(out)!r} already exists and is not empty; pass --resume to continue it or choose another --output")


def prepare_output(out: Path, cfg, resume: bool) -> None:
    """Create ``out`` with the run's ``config.yaml`` (any config dataclass); refuse to
    touch an existing folder unless resuming the same config."""
    saved = out / "config.yaml"
    if resume:
        if not saved.exists():
            raise ConfigError(f"--resume needs an existing run folder with config.yaml (none in {str(out)!r})")
        if yaml.safe_load(saved.read_text()) != to_dict(cfg):
            raise ConfigError(f"--resume: the configuration differs from the one in {str(saved)!r}; resume with the same settings")
        return
    refuse_to_overwrite(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def train_all(cfg: MarkovStudyConfig, out: Path, resume: bool = False, show_progress: bool = True) -> None:
    """Train every (model, seed) not yet done, in parallel worker processes."""
    jobs = [
        (cfg, name, seed, str(run_dir_of(out, name, seed)), resume)
        for name in cfg.models
        for seed in cfg.seeds
        if not (run_dir_of(out, name, seed) / "done.json").exists()
    ]
    run_jobs(_run_one, jobs, [cfg.train.epochs] * len(jobs), f"training {len(jobs)} runs (epochs)", cfg.workers, show_progress)


def load_metrics(out: Path, cfg: MarkovStudyConfig) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {metric: array (seeds, epochs + 1)}}`` from the run folder."""
    result = {}
    for name in cfg.models:
        rows = [read_jsonl(run_dir_of(out, name, s) / "metrics.jsonl") for s in cfg.seeds]
        keys = [k for k in rows[0][0] if k != "epoch"]
        result[name] = {k: np.array([[r[k] for r in rs] for rs in rows]) for k in keys}
    return result


def run_markov_study(cfg: MarkovStudyConfig, out: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """The whole study: data, training, figures, summary. Returns the summary dict."""
    from loopscape.reporting.figures import plot_accuracy_curves, plot_ic_distribution
    from loopscape.reporting.summary import summarise_markov

    out = Path(out)
    prepare_output(out, cfg, resume)
    lang, task = build_task(cfg.data)
    data = data_summary(lang, task)
    write_json(out / "data.json", data)
    t0 = time.perf_counter()
    train_all(cfg, out, resume=resume, show_progress=show_progress)
    wall = time.perf_counter() - t0
    metrics = load_metrics(out, cfg)
    plot_ic_distribution(task, out / "figures" / "fig3a_ic_distribution.png")
    plot_accuracy_curves(metrics, out / "figures" / "fig3b_accuracy.png", ceiling=data["bayes_ceiling"])
    summary = summarise_markov(metrics, data, cfg)
    summary["training_wall_s"] = wall
    if cfg.hessian_seeds:
        summary.update(hessian_study(out, cfg))
        summary["markdown"] += "\n" + summary.pop("hessian_markdown")
    atomic_write_text(out / "summary.md", summary.pop("markdown"))
    write_json(out / "summary.json", summary)
    return summary


def measured_force(out: Path, cfg: MarkovStudyConfig, ref: int) -> dict:
    """Theorem 1's C per model (first tracked seed): river/valley basis fixed at epoch ``ref``,
    coupling measured at every 50th tracked epoch after it."""
    from loopscape.landscape.river_valley import cumulative_force
    from loopscape.landscape.tracking import hessian_at, load_thetas

    _, task = build_task(cfg.data)
    x, y = task.train.inputs, task.train.targets
    result = {"reference_epoch": ref}
    for name, T in cfg.models.items():
        thetas = load_thetas(run_dir_of(out, name, cfg.hessian_seeds[0]) / "spectra.jsonl")
        if ref not in thetas:
            continue
        model = cfg.model.build(cfg.data.vocab_size, T)
        final = max(thetas)
        later = [e for e in thetas if e > ref and (e - ref) % 50 == 0] or [final]
        H_ref = hessian_at(model, thetas[ref], x, y)
        result[name] = {**cumulative_force(H_ref, [hessian_at(model, thetas[e], x, y) for e in later], thetas[ref], thetas[final]), "epochs": later}
    return result


def hessian_study(out: Path, cfg: MarkovStudyConfig) -> dict:
    """Figures 3c, 3d, 9b, 9c, the landscape table and the Observation 2 / Assumption 1 verdicts."""
    from loopscape.reporting import hessian as rep

    spectra = {m: [load_spectra(run_dir_of(out, m, s) / "spectra.jsonl") for s in cfg.hessian_seeds] for m in cfg.models}
    traj = rep.trajectories(spectra, cfg.hessian.n_bins)
    rep.plot_metrics(traj, out / "figures" / "fig3cd_entropy_mutual_information.png")
    rep.plot_snapshots(spectra, out / "figures" / "fig9bc_eigenspectra.png")
    verdict = rep.observation2_verdict(traj, cfg.hessian.n_bins)
    epochs = sorted({e for e in (150, cfg.train.epochs) if e <= cfg.train.epochs})
    land = rep.landscape_table(spectra, epochs)
    land["cumulative_force"] = measured_force(out, cfg, ref=epochs[0])
    return {
        "observation2": verdict,
        "landscape": land,
        "hessian_curves": {m: {k: v.tolist() for k, v in t.items()} for m, t in traj.items()},
        "hessian_markdown": rep.hessian_markdown(verdict, land, cfg.hessian.n_bins),
    }
