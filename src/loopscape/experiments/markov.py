"""The sample-level and Hessian study of Section 4.1 (Observations 1-2, Assumption 1;
Figures 3a-3d, 9b, 9c).

Trains Single-Attn and Looped-Attn on one Markov language over several seeds
(the seed drives initialisation and batch order; the language and training
set are fixed by ``data.seed``) and writes a run folder::

    OUT/config.yaml                   the resolved configuration
    OUT/data.json                     transition matrices, IC statistics, Bayes ceilings
    OUT/runs/<model>/seed<k>/         metrics.jsonl, checkpoints/, model.safetensors
    OUT/runs/<model>/seed<k>/spectra.jsonl   exact Hessian spectra (the first ``hessian.n_seeds`` seeds)
    OUT/figures/fig3a_ic_distribution.png, fig3b_accuracy.png, fig3cd_*.png, fig9bc_*.png
    OUT/summary.md, OUT/summary.json  tables beside the paper's numbers, verdicts
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.utils import vector_to_parameters

from loopscape.config import require, require_seeds
from loopscape.data.languages import PAPER_IC_MAX, PAPER_REPORTED, PAPER_SIMPLE_SHARE, feasibility, fit, language_facts
from loopscape.data.languages import RULE as LANGUAGE_RULE
from loopscape.data.markov import MarkovDataConfig, MarkovLanguage, MarkovTask, bayes_ceiling, build_task
from loopscape.errors import DamagedRunError
from loopscape.experiments.parallel import epoch_progress, run_jobs
from loopscape.io import atomic_write_text, prepare_run_folder, read_json_file, read_jsonl, write_json
from loopscape.landscape.hessian import weighted_batches
from loopscape.landscape.loops import loop_coupling, loop_hessian
from loopscape.landscape.river_valley import common_eps, cumulative_force
from loopscape.landscape.tracking import HessianTracker, hessian_at, load_spectra, load_thetas
from loopscape.models.linear_attn import LinearAttn, LinearAttnConfig, untied_like
from loopscape.reporting import hessian as hessian_report
from loopscape.reporting.figures import plot_accuracy_curves, plot_ic_and_cp, plot_ic_distribution
from loopscape.reporting.html import Section, StudyReport
from loopscape.reporting.summary import (
    COROLLARY2_RULE,
    PHASE_EPOCH,
    corollary2_row,
    corollary2_verdict,
    observation1_row,
    summarise_markov,
)
from loopscape.reporting.verdicts import describe
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.run import seeded, verify_finished

# Section 4.1's toy model: T = 3; one position code per training input position (no slot that
# training never reaches), counted cyclically from the end at test lengths, so the query keeps its training
# code and the codes cycle with the transitions' period (E.1.3; the phase-consistent reading of Table 1)
PAPER_TOY_MODEL = LinearAttnConfig(n_loops=3, max_len=3, positions="cyclic_end")


@dataclass
class HessianTrackingConfig:
    """Hessian tracking (Observation 2): exact spectra every ``every`` epochs for the first ``n_seeds`` seeds."""

    enabled: bool = True
    every: int = 1
    n_seeds: int = 5  # every verdict on the Hessian is a test over these seeds
    n_bins: int = 50

    def validate(self, p: str = "") -> None:
        require(self.every >= 1, f"{p}every", "an integer >= 1", self.every)
        require(self.n_seeds >= 1, f"{p}n_seeds", "an integer >= 1", self.n_seeds)
        require(self.n_bins >= 2, f"{p}n_bins", "an integer >= 2", self.n_bins)


@dataclass
class MarkovStudyConfig:
    """The sample-level study. ``model`` is the toy model's own config; its
    ``n_loops`` is Looped-Attn's ``T`` (Single-Attn runs one loop)."""

    data: MarkovDataConfig = field(default_factory=MarkovDataConfig)
    model: LinearAttnConfig = field(default_factory=lambda: dataclasses.replace(PAPER_TOY_MODEL))  # a study's own copy
    train: MarkovTrainConfig = field(default_factory=MarkovTrainConfig)
    hessian: HessianTrackingConfig = field(default_factory=HessianTrackingConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    workers: int = 0  # 0: one per core, at most one per run

    def validate(self, p: str = "") -> None:
        require_seeds(self.seeds, f"{p}seeds")
        require(
            self.model.n_loops >= 2,
            f"{p}model.n_loops",
            "an integer >= 2 (Looped-Attn's T; Single-Attn is the one-loop model, trained beside it)",
            self.model.n_loops,
        )
        require(self.workers >= 0, f"{p}workers", "an integer >= 0", self.workers)
        require(
            self.model.vocab_size in (None, self.data.vocab_size),
            f"{p}model.vocab_size",
            f"null or data.vocab_size ({self.data.vocab_size})",
            self.model.vocab_size,
        )
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

    def build_model(self, n_loops: int) -> LinearAttn:
        """The toy model with the data's vocabulary and ``n_loops`` loops."""
        return LinearAttn(dataclasses.replace(self.model, vocab_size=self.data.vocab_size, n_loops=n_loops))


FEASIBILITY_LANGUAGES = 500  # random languages per data reading in the feasibility table


def data_summary(lang: MarkovLanguage, task: MarkovTask, data: MarkovDataConfig) -> dict:
    """The language's data facts beside the paper's, its headroom, and the feasibility table (no training)."""
    ic = task.train.ic
    ok = bayes_ceiling(task.train).float()
    facts = language_facts(data, built=(lang, task))
    return {
        "paper_facts": {"ic_max": PAPER_IC_MAX, "simple_share": PAPER_SIMPLE_SHARE, "rule": LANGUAGE_RULE},
        "facts": {"ic_max": facts["ic_max"], "simple_share": facts["simple_share"], **fit(facts)},
        "headroom": facts["headroom"],
        "feasibility": feasibility(data, FEASIBILITY_LANGUAGES),
        "paper_reported": PAPER_REPORTED,
        "transitions": lang.transitions.tolist(),
        "ic_unit": "bits",
        "n_train": len(task.train),
        "ic_max": ic.max().item(),
        "ic_low_max": ic[task.low].max().item(),
        "ic_high_min": ic[task.high].min().item(),
        "ic_train": ic.tolist(),
        "bayes_ceiling": {
            "all": ok.mean().item(),
            "low": ok[task.low].mean().item(),
            "high": ok[task.high].mean().item(),
        },
    }


# -- running ------------------------------------------------------------------------

UNTIED = "untied_attn"  # the coupling study's control: Looped-Attn unrolled, each loop its own weights


def _run_one(cfg: MarkovStudyConfig, name: str, seed: int, run_dir: str, resume: bool, progress_q=None) -> str:
    """Train one (model, seed); top-level so worker processes can run it."""
    if progress_q is not None:
        torch.set_num_threads(1)  # one core per worker: tiny matrices gain nothing from threads
    _, task = build_task(cfg.data)
    with seeded(seed):  # the untied control starts from this seed's Looped-Attn, every loop a copy
        model = (
            untied_like(cfg.build_model(cfg.models["looped_attn"]))
            if name == UNTIED
            else cfg.build_model(cfg.models[name])
        )
    trackers = (
        [HessianTracker(task.train.inputs, task.train.targets, cfg.data.vocab_size, cfg.hessian.every)]
        if seed in cfg.hessian_seeds and name != UNTIED
        else []
    )
    on_epoch = epoch_progress(run_dir, resume, progress_q)
    train_markov(model, task, cfg.train, run_dir, seed=seed, resume=resume, on_epoch=on_epoch, trackers=trackers)
    write_json(Path(run_dir) / "done.json", {"epochs": cfg.train.epochs})
    return run_dir


def untied_control(out: Path, cfg: MarkovStudyConfig, task: MarkovTask) -> list[dict]:
    """Per tracked seed at the last epoch: kappa over the eps grid of Looped-Attn (tied) and of its untied control,
    both cut at one eps (relative to the larger of their largest |lambda|), and the smallest log10 ratio."""
    x, y = task.train.inputs, task.train.targets
    rows = []
    for seed in cfg.hessian_seeds:
        verify_finished(run_dir_of(out, UNTIED, seed))
        with seeded(seed):
            model = untied_like(cfg.build_model(cfg.models["looped_attn"]))
        model.load_state_dict(load_file(str(run_dir_of(out, UNTIED, seed) / "model.safetensors")))
        theta = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        untied = torch.linalg.eigvalsh(hessian_at(model, theta, x, y, cfg.data.vocab_size)).numpy()
        epochs, eigs = load_spectra(run_dir_of(out, "looped_attn", seed) / "spectra.jsonl")
        tied = eigs[list(epochs).index(max(epochs))]
        rows.append({"seed": seed, "epoch": int(max(epochs)), **hessian_report.tied_against_untied(tied, untied)})
    return rows


def timed_across_resumes(record: Path, fn, *args) -> float:
    """Run ``fn(*args)`` and return the wall time it has taken over every session of the run:
    each session, finished or interrupted by an error, adds its time to ``record``."""
    spent = read_json_file(record)["wall_s"] if record.exists() else 0.0
    t0 = time.perf_counter()
    try:
        fn(*args)
    finally:
        spent += time.perf_counter() - t0
        write_json(record, {"wall_s": spent})
    return spent


def run_dir_of(out: Path, name: str, seed: int) -> Path:
    """The run folder of one (model, seed) inside the study's folder."""
    return out / "runs" / name / f"seed{seed}"


def is_done(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` finished. A damaged ``done.json`` is repaired from the run it marks,
    once that run is verified (``final.json``: logs and weights as written); an unverifiable run is refused
    in one line naming its file."""
    done = run_dir / "done.json"
    if not done.exists():
        return False
    try:
        read_json_file(done)
    except DamagedRunError:
        verify_finished(run_dir)
        write_json(done, {"epochs": epochs})
    return True


def train_all(
    cfg: MarkovStudyConfig,
    out: Path,
    resume: bool = False,
    show_progress: bool = True,
    runs: list[tuple[str, int]] | None = None,
) -> None:
    """Train every (model, seed) of ``runs`` (default: every model on every seed) not yet done, in parallel
    worker processes."""
    runs = [(name, seed) for name in cfg.models for seed in cfg.seeds] if runs is None else runs
    jobs = [
        (cfg, name, seed, str(run_dir_of(out, name, seed)), resume)
        for name, seed in runs
        if not is_done(run_dir_of(out, name, seed), cfg.train.epochs)
    ]
    run_jobs(
        _run_one,
        jobs,
        [cfg.train.epochs] * len(jobs),
        f"{out.name}: training {len(jobs)} runs of {', '.join(sorted({j[1] for j in jobs}))} (epochs)",
        cfg.workers,
        show_progress,
        folder=out,
    )


def load_metrics(out: Path, cfg: MarkovStudyConfig) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {metric: array (seeds, epochs + 1)}}`` from the run folder, each run checked to be
    what it wrote when it finished (logs, final weights)."""
    result = {}
    for name in cfg.models:
        for s in cfg.seeds:
            verify_finished(run_dir_of(out, name, s))
        rows = [read_jsonl(run_dir_of(out, name, s) / "metrics.jsonl") for s in cfg.seeds]
        keys = [k for k in rows[0][0] if k != "epoch"]
        result[name] = {k: np.array([[r[k] for r in rs] for rs in rows]) for k in keys}
    return result


def final_models(out: Path, cfg: MarkovStudyConfig) -> dict[str, list[LinearAttn]]:
    """Each model's final weights per seed, in evaluation mode."""
    models = {}
    for name, T in cfg.models.items():
        models[name] = []
        for s in cfg.seeds:
            m = cfg.build_model(T)
            m.load_state_dict(load_file(str(run_dir_of(out, name, s) / "model.safetensors")))
            models[name].append(m.eval())
    return models


def run_markov_study(
    cfg: MarkovStudyConfig, out: str | Path, resume: bool = False, show_progress: bool = True
) -> StudyReport:
    """The whole study: data, training, figures, summary (``summary.md``, ``summary.json``).

    Returns the summary, the verdicts on Observation 1 (and, with Hessian
    tracking, Observation 2 and Assumption 1) and the report section; its
    ``memory`` holds the data summary and the metrics arrays.
    """
    out = Path(out)
    prepare_run_folder(out, cfg, resume)
    lang, task = build_task(cfg.data)
    data = data_summary(lang, task, cfg.data)
    write_json(out / "data.json", data)
    wall = timed_across_resumes(out / "training_wall.json", train_all, cfg, out, resume, show_progress)
    metrics = load_metrics(out, cfg)
    figs = out / "figures"
    plot_ic_distribution(task, figs / "fig3a_ic_distribution.png")
    plot_ic_and_cp(task, figs / "fig9a_ic_cp.png")
    plot_accuracy_curves(metrics, figs / "fig3b_accuracy.png", ceiling=data["bayes_ceiling"])
    summary = summarise_markov(metrics, data, cfg)
    summary["training_wall_s"] = wall
    markdown = summary.pop("markdown")
    summary["corollary2"] = corollary2_verdict(metrics)
    markdown += (
        f"\n## Verdict on Corollary 2 / Theorem 2 (c) (lower training loss): **{summary['corollary2']['verdict']}**\n\n"
        f"Rule: {COROLLARY2_RULE}. {describe(summary['corollary2']['test'])}.\n"
    )
    verdicts = [observation1_row(summary["observation1"], data), corollary2_row(summary["corollary2"])]
    figures = [
        (figs / "fig3a_ic_distribution.png", "Figure 3a: IC distribution of the training set"),
        (figs / "fig3b_accuracy.png", "Figure 3b: training accuracy on low / high IC sequences"),
        (figs / "fig9a_ic_cp.png", "Figure 9(a): the training set by IC and by CP (read as the chain probability)"),
    ]
    if cfg.hessian_seeds:
        hessian = hessian_study(out, cfg, task, resume, show_progress)
        markdown += "\n" + hessian.pop("hessian_markdown")
        verdicts += hessian.pop("hessian_rows")
        summary.update(hessian)
        figures += [
            (
                figs / "fig3cd_entropy_mutual_information.png",
                "Figures 3c, 3d: Matrix Entropy and Mutual Information of the Hessian",
            ),
            (figs / "fig9bc_eigenspectra.png", "Figures 9b, 9c: eigenspectrum snapshots"),
            (figs / "kappa_over_eps.png", "Valley kappa over the threshold eps, one eps per compared pair"),
            (figs / "loop_coupling.png", "The Hessian split by loop pairs: cross-loop share and valley shapes"),
        ]
    atomic_write_text(out / "summary.md", markdown)
    write_json(out / "summary.json", summary)
    section = Section("markov", "Sample level and Hessian", markdown, figures)
    return StudyReport(summary, verdicts, section, memory={"data": data, "metrics": metrics})


def measured_force(out: Path, cfg: MarkovStudyConfig, task: MarkovTask, ref: int) -> dict:
    """Theorem 1's C per model and tracked seed: river/valley basis fixed at epoch ``ref`` with ONE eps for
    both models (:func:`common_eps` of their spectra there), coupling measured at every 50th tracked epoch
    after it."""
    x, y = task.train.inputs, task.train.targets
    result = {"reference_epoch": ref, "per_seed": []}
    for seed in cfg.hessian_seeds:
        thetas = {name: load_thetas(run_dir_of(out, name, seed) / "spectra.jsonl") for name in cfg.models}
        if any(ref not in t for t in thetas.values()):
            continue
        H_ref = {
            name: hessian_at(cfg.build_model(T), thetas[name][ref], x, y, cfg.data.vocab_size)
            for name, T in cfg.models.items()
        }
        eps = common_eps(*(torch.linalg.eigvalsh(H.double()) for H in H_ref.values()))
        row = {"seed": seed}
        for name, T in cfg.models.items():
            model, th = cfg.build_model(T), thetas[name]
            final = max(th)
            later = [e for e in th if e > ref and (e - ref) % 50 == 0] or [final]
            row[name] = {
                **cumulative_force(
                    H_ref[name],
                    [hessian_at(model, th[e], x, y, cfg.data.vocab_size) for e in later],
                    th[ref],
                    th[final],
                    eps=eps,
                ),
                "epochs": later,
            }
        result["per_seed"].append(row)
    return result


def coupling_along_training(out: Path, cfg: MarkovStudyConfig, task: MarkovTask, every: int = 100) -> dict:
    """The tied Hessian of the attention weights split by loop pairs (:mod:`loopscape.landscape.loops`): along
    training (every ``every``-th tracked epoch, the first and last) on each looped model's first tracked seed, and at
    the last epoch of Looped-Attn on every tracked seed (``per_seed``, with kappa over the eps grid)."""
    result = {}
    batches = weighted_batches(task.train.inputs, task.train.targets, dedupe="inputs", num_classes=cfg.data.vocab_size)

    done: dict[tuple, dict] = {}  # the first seed's last epoch is both on the trajectory and a per-seed row

    def measured(name: str, seed: int, epoch: int, theta: torch.Tensor) -> dict:
        if (name, seed, epoch) not in done:
            model = cfg.build_model(cfg.models[name]).double()
            with torch.no_grad():
                vector_to_parameters(theta, list(model.parameters()))
            done[name, seed, epoch] = loop_coupling(loop_hessian(model, batches), k=5, curves=True)
        return done[name, seed, epoch]

    first = cfg.hessian_seeds[0]
    for name, T in cfg.models.items():
        thetas = load_thetas(run_dir_of(out, name, first) / "spectra.jsonl")
        if not thetas or T == 1:  # one loop: no pair of loops to split
            continue
        epochs = sorted({e for e in thetas if e % every == 0} | {min(thetas), max(thetas)})
        result[name] = {"n_loops": T, "rows": [{"epoch": e, **measured(name, first, e, thetas[e])} for e in epochs]}
    result["per_seed"] = []
    for seed in cfg.hessian_seeds:
        thetas = load_thetas(run_dir_of(out, "looped_attn", seed) / "spectra.jsonl")
        if thetas:
            last = max(thetas)
            result["per_seed"].append(
                {"seed": seed, "epoch": last, **measured("looped_attn", seed, last, thetas[last])}
            )
    return result


def hessian_study(
    out: Path, cfg: MarkovStudyConfig, task: MarkovTask, resume: bool = False, show_progress: bool = True
) -> dict:
    """Figures 3c, 3d, 9b, 9c, the landscape tables and the verdicts on Observation 2, the Mutual Information
    statements, Assumption 1, Corollary 1, Conjectures 1-2 and the V-valley's source, over the tracked seeds."""
    rep = hessian_report
    spectra = {
        m: [load_spectra(run_dir_of(out, m, s) / "spectra.jsonl") for s in cfg.hessian_seeds] for m in cfg.models
    }
    traj = rep.trajectories(spectra, cfg.hessian.n_bins)
    figs = out / "figures"
    rep.plot_metrics(traj, figs / "fig3cd_entropy_mutual_information.png")
    rep.plot_snapshots(spectra, figs / "fig9bc_eigenspectra.png")
    o2 = rep.observation2_verdict(spectra, cfg.hessian.n_bins, cfg.hessian_seeds)
    mi = rep.mutual_information_verdict(spectra, cfg.hessian.n_bins, cfg.hessian_seeds)
    epochs = sorted({e for e in (PHASE_EPOCH, cfg.train.epochs) if e <= cfg.train.epochs})
    land = rep.landscape_table(spectra, epochs)
    land["cumulative_force"] = measured_force(out, cfg, task, ref=epochs[0])
    a1 = rep.assumption1_verdict(land, epochs)
    cor1 = rep.corollary1_verdict(land["cumulative_force"])
    conj = rep.conjectures_verdict(land, cfg.train.epochs)
    coupling = coupling_along_training(out, cfg, task)
    if cfg.train.epochs >= PHASE_EPOCH:  # judged on trained models only: a shorter run's control is not trained
        train_all(cfg, out, resume, show_progress, runs=[(UNTIED, s) for s in cfg.hessian_seeds])
        coupling["untied_control"] = untied_control(out, cfg, task)
    else:
        coupling["untied_control"] = []
    rep.plot_coupling(coupling, figs / "loop_coupling.png")
    rep.plot_kappa_curves(land, cfg.train.epochs, figs / "kappa_over_eps.png", coupling)
    coupling_v = rep.coupling_verdict(coupling)
    control_v = rep.untied_control_verdict(coupling["untied_control"])
    markdown = rep.hessian_markdown(o2, mi, land, a1, cor1, conj, cfg.hessian_seeds, cfg.hessian.n_bins)
    return {
        "observation2": o2,
        "mutual_information": mi,
        "assumption1": a1,
        "corollary1": cor1,
        "conjectures": conj,
        "landscape": land,
        "loop_coupling": {**coupling, "verdict": coupling_v, "control_verdict": control_v},
        "hessian_curves": {m: {k: v.tolist() for k, v in t.items()} for m, t in traj.items()},
        "hessian_rows": [
            *rep.observation2_rows(o2, mi),
            *rep.landscape_rows(a1, cor1, conj),
            rep.coupling_row(coupling_v),
            rep.untied_control_row(control_v),
        ],
        "hessian_markdown": markdown
        + rep.coupling_markdown(coupling)
        + rep.untied_control_markdown(control_v, coupling["untied_control"]),
    }
