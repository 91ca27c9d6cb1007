"""SHIFT on the Markov language (Section 5, Figure 4).

The shift-point study trains, for every seed of the Markov study, SHIFT with
each fixed shift epoch (0 is Looped-Attn from the start) and with SCP's own
choice, plus a few policies again with Adam's moments reset at the switch (the
experiment behind the ``optimizer`` default). All members train together
(:mod:`loopscape.training.population`), split over worker processes by seed.
One SCP run is also trained end to end with the single-model trainer, so the
wall-time accounting can be checked against a measured SHIFT run.

Writes into ``OUT``::

    population/part<k>/        metrics.jsonl (lists over members), checkpoints/, members.json
    measured_scp/              the end-to-end SCP run (metrics.jsonl)
    shift.json                 every number
    figures/                   Figure 4 (shift points), accuracy against compute
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from loopscape.config import require
from loopscape.data.markov import build_task
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.experiments.parallel import epoch_progress, run_jobs
from loopscape.io import lock_run_folder, read_json_file, read_jsonl, write_json
from loopscape.reporting import shift as shift_report
from loopscape.reporting.html import Section, StudyReport
from loopscape.reporting.stats import mean_std
from loopscape.shift import compute
from loopscape.shift.criterion import SCPConfig
from loopscape.shift.schedule import OPTIMIZER_AT_SHIFT, SWITCH_KEY, ShiftConfig, recorded_switch
from loopscape.training.markov import train_markov
from loopscape.training.population import load_member, member_curves, train_population
from loopscape.training.run import seeded, verify_finished

SCP = "scp"


@dataclass
class ShiftStudyConfig:
    """The shift-point study. Policies are shift epochs as text, or ``"scp"``: SCP with ``scp``, the ``scp``
    section of :class:`~loopscape.shift.schedule.ShiftConfig` (every SCP setting, ``shift_by`` included)."""

    shift_epochs: list[int] = field(default_factory=lambda: [0, 50, 100, 120, 150, 200, 300, 400])
    scp: SCPConfig = field(default_factory=SCPConfig)
    optimizer: str = "keep"  # Adam's moments at the switch; see docs/shift.md for the experiment
    compare_optimizer: list[str] = field(default_factory=lambda: ["100", "150", "200", SCP])
    tolerance: float = 0.005  # target = Looped-Attn's final accuracy minus this
    measure_wall: bool = True

    def validate(self, p: str = "") -> None:
        require(all(s >= 0 for s in self.shift_epochs), f"{p}shift_epochs", "integers >= 0", self.shift_epochs)
        require(
            0 in self.shift_epochs,
            f"{p}shift_epochs",
            "a list that includes 0 (the Looped-Attn baseline)",
            self.shift_epochs,
        )
        require(
            self.optimizer in OPTIMIZER_AT_SHIFT, f"{p}optimizer", f"one of {list(OPTIMIZER_AT_SHIFT)}", self.optimizer
        )
        allowed = [str(s) for s in self.shift_epochs] + [SCP]
        for c in self.compare_optimizer:
            require(c in allowed, f"{p}compare_optimizer", f"entries among {allowed}", c)
        require(0 <= self.tolerance < 1, f"{p}tolerance", "a number in [0, 1) (accuracy, not percent)", self.tolerance)

    @property
    def other_optimizer(self) -> str:
        return next(o for o in OPTIMIZER_AT_SHIFT if o != self.optimizer)

    def policies(self) -> list[tuple[str, str]]:
        """``(policy, optimizer)`` pairs, the default optimizer first."""
        main = [(str(s), self.optimizer) for s in self.shift_epochs] + [(SCP, self.optimizer)]
        return main + [(c, self.other_optimizer) for c in self.compare_optimizer]

    def shift_config(self, policy: str, optimizer: str, n_loops: int) -> ShiftConfig:
        """A policy as the one SHIFT setting every trainer and callback builds from: SCP with this study's
        ``scp``, or a fixed shift epoch given as text."""
        if policy == SCP:
            return ShiftConfig(n_loops, scp=replace(self.scp), optimizer=optimizer)
        return ShiftConfig(n_loops, at=int(policy), optimizer=optimizer)


def _train_part(
    cfg: MarkovStudyConfig, shift: ShiftStudyConfig, seeds: list[int], run_dir: str, resume: bool, progress_q=None
) -> str:
    """Train the members of ``seeds`` (every policy) as one population; top-level for workers."""
    torch.set_num_threads(1)
    _, task = build_task(cfg.data)
    members = [(seed, policy, opt) for seed in seeds for policy, opt in shift.policies()]
    models = []
    for seed, _, _ in members:
        with seeded(seed):
            models.append(cfg.build_model(1))
    schedules = [shift.shift_config(p, o, cfg.model.n_loops).build() for _, p, o in members]
    on_epoch = epoch_progress(run_dir, resume, progress_q)
    train_population(
        models, [m[0] for m in members], schedules, task, cfg.train, run_dir, resume=resume, on_epoch=on_epoch
    )
    info = [
        {
            "seed": s,
            "policy": p,
            "optimizer": o,
            SWITCH_KEY: sc.shift_step,
            **({"plateau_at": sc.criterion.plateau_at, "forced": sc.criterion.forced} if sc.criterion else {}),
        }
        for (s, p, o), sc in zip(members, schedules)
    ]
    write_json(Path(run_dir) / "members.json", info)
    return run_dir


def _train_measured(
    cfg: MarkovStudyConfig, shift: ShiftStudyConfig, seed: int, run_dir: str, resume: bool, progress_q=None
) -> str:
    """One SCP SHIFT run with the single-model trainer, for a measured wall time."""
    torch.set_num_threads(1)
    _, task = build_task(cfg.data)
    with seeded(seed):
        model = cfg.build_model(1)
    schedule = shift.shift_config(SCP, shift.optimizer, cfg.model.n_loops).build()
    on_epoch = epoch_progress(run_dir, resume, progress_q)
    train_markov(model, task, cfg.train, run_dir, seed=seed, resume=resume, on_epoch=on_epoch, schedule=schedule)
    write_json(Path(run_dir) / "done.json", {SWITCH_KEY: schedule.shift_step})
    return run_dir


def train_shift(
    cfg: MarkovStudyConfig, shift: ShiftStudyConfig, out: Path, resume: bool = False, show_progress: bool = True
) -> None:
    """Train what is not done yet: one population per group of seeds, and the measured SCP run."""
    workers = cfg.workers or min(2, len(cfg.seeds))
    jobs = []
    for k, seeds in enumerate(np.array_split(np.array(cfg.seeds), min(workers, len(cfg.seeds)))):
        rd = out / "population" / f"part{k}"
        if not (rd / "members.json").exists():
            jobs.append(("part", (cfg, shift, [int(s) for s in seeds], str(rd), resume)))
    if shift.measure_wall and not (out / "measured_scp" / "done.json").exists():
        jobs.append(("measured", (cfg, shift, cfg.seeds[0], str(out / "measured_scp"), resume)))
    run_jobs(
        _dispatch,
        jobs,
        [cfg.train.epochs] * len(jobs),
        f"SHIFT study: {len(jobs)} jobs (epochs)",
        workers,
        show_progress,
        folder=out,
    )


def _dispatch(kind: str, job: tuple, progress_q=None) -> str:
    return {"part": _train_part, "measured": _train_measured}[kind](*job, progress_q)


# -- analysis --------------------------------------------------------------------------


def load_members(out: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every member's description and its curves ``{metric: (members, epochs + 1)}``."""
    info, curves = [], []
    for part in sorted((out / "population").glob("part*")):
        verify_finished(part)
        info += read_json_file(part / "members.json")
        curves.append(member_curves(read_jsonl(part / "metrics.jsonl")))
    return info, {k: np.concatenate([c[k] for c in curves]) for k in curves[0]}


def epoch_wall_times(metrics: dict[str, dict[str, np.ndarray]], cfg: MarkovStudyConfig) -> dict[int, float]:
    """Median training time of one epoch, per loop count, from the Markov study's runs."""
    return {T: float(np.median(metrics[name]["time_s"][:, 1:])) for name, T in cfg.models.items()}


DROP_WINDOW = 5  # epochs after the switch in which E.2.2(b)'s accuracy drop is looked for


def drop_at_shift(acc: np.ndarray, shift_epoch: int | None) -> float | None:
    """E.2.2(b)'s accuracy drop at the switch, in points: the accuracy (row ``e`` = after epoch ``e``) of the
    last Stage-I epoch (the schedule's ``shift_step``) minus the lowest of the ``DROP_WINDOW`` Stage-II epochs
    after it (``None`` without a switch inside the run)."""
    if shift_epoch is None or shift_epoch < 0 or shift_epoch >= acc.size - 1:
        return None
    return float(100 * (acc[shift_epoch] - acc[shift_epoch + 1 : shift_epoch + 1 + DROP_WINDOW].min()))


def analyse_shift(
    cfg: MarkovStudyConfig, shift: ShiftStudyConfig, out: Path, markov: dict[str, dict[str, np.ndarray]]
) -> dict:
    """Speed-ups and accuracies per policy, against the Markov study's runs (``markov``: their metrics)."""
    info, curves = load_members(out)
    d = cfg.build_model(1).config.d
    n_in = cfg.data.length - 1
    flops = {
        T: compute.epoch_flops(cfg.data.n_train, cfg.train.batch_size, n_in, d, cfg.data.vocab_size, T)
        for T in (1, cfg.model.n_loops)
    }
    wall = epoch_wall_times(markov, cfg)
    loops = curves["n_loops"]
    cum = {"flops": compute.cumulative(loops, flops), "wall_s": compute.cumulative(loops, wall)}
    acc = curves["acc_all"]
    key = [(m["policy"], m["optimizer"]) for m in info]
    seeds = [m["seed"] for m in info]
    baseline = {s: i for i, (k, s) in enumerate(zip(key, seeds)) if k == ("0", shift.optimizer)}
    target = float(np.mean([acc[i, -1] for i in baseline.values()])) - shift.tolerance

    per_member = []
    for i, m in enumerate(info):
        b = baseline[m["seed"]]
        row = {**m, "final": {g: float(curves[g][i, -1]) for g in ("acc_all", "acc_low", "acc_high", "val_loss")}}
        row["looped_epochs_speedup"] = compute.looped_epochs_speedup(cfg.train.epochs, recorded_switch(m))
        for clock, c in cum.items():
            e_hit, cost = compute.time_to_target(acc[i], c[i], target)
            e_base, cost_base = compute.time_to_target(acc[b], c[b], target)
            row[clock] = {
                "total": float(c[i, -1]),
                "speedup_total": float(c[b, -1] / c[i, -1]),
                "epoch_to_target": e_hit,
                "to_target": cost,
                "speedup_to_target": float(cost_base / cost)
                if e_hit is not None and e_base is not None and cost > 0
                else None,
            }
        per_member.append(row)

    policies = {}
    base = {s: per_member[i] for s, i in baseline.items()}
    for policy, opt in shift.policies():
        rows = [r for r in per_member if (r["policy"], r["optimizer"]) == (policy, opt)]
        entry = {"shift_epochs": [recorded_switch(r) for r in rows]}
        paper = [r["looped_epochs_speedup"] for r in rows if r["looped_epochs_speedup"] is not None]
        entry["looped_epochs_speedup"] = mean_std(paper) | {"reached": len(paper)}
        for clock in cum:
            for k in ("speedup_total", "speedup_to_target"):
                vals = [r[clock][k] for r in rows if r[clock][k] is not None]
                entry[f"{clock}_{k}"] = mean_std(vals) | {"reached": len(vals)}
        for g in ("acc_all", "acc_low", "acc_high"):
            entry[g] = mean_std([100 * r["final"][g] for r in rows])
            entry[f"{g}_minus_looped"] = mean_std([100 * (r["final"][g] - base[r["seed"]]["final"][g]) for r in rows])
        entry["per_seed"] = [  # what the verdicts test over seeds
            {
                "seed": r["seed"],
                "shift_epoch": recorded_switch(r),
                "flops_speedup_total": r["flops"]["speedup_total"],
                "looped_epochs_speedup": r["looped_epochs_speedup"],
                "acc_all_minus_looped": 100 * (r["final"]["acc_all"] - base[r["seed"]]["final"]["acc_all"]),
                "drop_at_shift_pts": drop_at_shift(acc[per_member.index(r)], recorded_switch(r)),
            }
            for r in rows
        ]
        policies[f"{policy}/{opt}"] = entry

    checks = {}
    looped = markov["looped_attn"]["acc_all"]  # (seeds, epochs + 1), seeds in cfg.seeds order
    checks["population_vs_single_model_trainer_max_abs_diff_acc_all"] = float(
        np.abs(looped - acc[[baseline[s] for s in cfg.seeds]]).max()
    )
    measured = out / "measured_scp"
    if (measured / "done.json").exists():
        verify_finished(measured)
        rows = read_jsonl(measured / "metrics.jsonl")
        sched = np.array([r["n_loops"] for r in rows])
        predicted = float(compute.cumulative(sched, wall)[-1])
        checks["measured_scp_run"] = {
            "seed": cfg.seeds[0],
            "shift_epoch": recorded_switch(read_json_file(measured / "done.json")),
            "measured_wall_s": float(sum(r["time_s"] for r in rows)),
            "predicted_wall_s": predicted,
        }
    return {
        # the wall clock depends on what else ran: the load average beside it (1, 5, 15 minutes) when analysed
        "machine_load": {"loadavg": list(os.getloadavg()), "cpus": os.cpu_count()},
        "target_acc_all": target,
        "tolerance": shift.tolerance,
        "epoch_flops": {str(k): v for k, v in flops.items()},
        "epoch_wall_s": {str(k): v for k, v in wall.items()},
        "policies": policies,
        "members": per_member,
        "checks": checks,
        "curves": {
            "acc_all": acc.tolist(),
            "acc_high": curves["acc_high"].tolist(),
            "val_loss": curves["val_loss"].tolist(),
            "grad_norm": curves["grad_norm"].tolist(),
        },
        "cumulative": {k: v.tolist() for k, v in cum.items()},
    }


def scp_models(cfg: MarkovStudyConfig, shift: ShiftStudyConfig, out: Path) -> list[torch.nn.Module]:
    """SHIFT with SCP (the default optimizer setting), one final model per seed."""
    template = cfg.build_model(cfg.model.n_loops)
    models = []
    for part in sorted((out / "population").glob("part*")):
        for k, m in enumerate(read_json_file(part / "members.json")):
            if (m["policy"], m["optimizer"]) == (SCP, shift.optimizer):
                T = cfg.model.n_loops if recorded_switch(m) is not None else 1
                models.append(load_member(part / "model.safetensors", template, k, T).eval())
    return models


def run_shift_study(
    cfg: MarkovStudyConfig,
    shift: ShiftStudyConfig,
    out: Path,
    markov_metrics: dict[str, dict[str, np.ndarray]],
    resume: bool = False,
    show_progress: bool = True,
) -> StudyReport:
    """Train what is not done, analyse against the Markov study's metrics, draw Figure 4
    and write ``shift.json``; its ``memory`` holds SCP's final models."""
    lock_run_folder(out)
    train_shift(cfg, shift, out, resume=resume, show_progress=show_progress)
    results = analyse_shift(cfg, shift, out, markov_metrics)
    write_json(out / "shift.json", results)
    figs = out / "figures"
    shift_report.plot_shift_points(results, shift.optimizer, figs / "fig4_shift_points.png")
    shift_report.plot_compute_curves(results, shift.optimizer, figs / "shift_compute_curves.png")
    markdown, verdicts = shift_report.shift_markdown(results, shift, cfg.train.epochs)
    section = Section(
        "shift",
        "SHIFT",
        markdown,
        [
            (
                figs / "fig4_shift_points.png",
                "Figure 4: speed-up and final accuracy against the shift epoch (stars: SCP)",
            ),
            (figs / "shift_compute_curves.png", "Accuracy against cumulative compute"),
        ],
    )
    report = StudyReport(results, shift_report.verdict_rows(verdicts), section)
    never = sum(e is None for e in results["policies"][f"{SCP}/{shift.optimizer}"]["shift_epochs"])
    report.memory = {"verdicts": verdicts, "scp_models": scp_models(cfg, shift, out), "scp_never_shifted": never}
    return report
