"""`loopscape reproduce`: the whole Markov section of the paper in one run.

Sample-level and Hessian study (Section 4.1), theory (Sections 4.2-4.3, 5),
SHIFT (Section 5, Figure 4) and length generalisation (Section 4.4, Table 1),
written as one self-contained HTML report with a JSON file of its numbers::

    OUT/config.yaml        the resolved configuration
    OUT/markov/            `loopscape markov`'s run folder
    OUT/theory/            `loopscape theory`'s output
    OUT/shift/             the SHIFT study (population runs, shift.json)
    OUT/figures/           Figure 4, compute curves, Figure 9
    OUT/report.html, OUT/report.json

Every part resumes (``resume=True``): finished runs are kept, unfinished ones
continue from their checkpoints, and the report is rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loopscape.config import from_dict, require, to_dict
from loopscape.experiments import shift as sh
from loopscape.experiments.markov import MarkovStudyConfig, prepare_output, run_dir_of, run_markov_study
from loopscape.experiments.theory import TheoryConfig, run_theory
from loopscape.io import atomic_write_text, read_json, write_json

# --quick: every part on a small scale (CI and tests); numbers are not meant to match the paper
QUICK = {
    "markov.train.epochs": 40,
    "markov.seeds": [0, 1],
    "markov.data.n_test": 1000,
    "shift.shift_epochs": [0, 10, 20, 30],
    "shift.compare_optimizer": ["20", "scp"],
    "shift.scp.patience": 5,
    "shift.scp.wait": 3,
    "shift.scp.max_wait": 10,
    "theory.instances": 20,
    "theory.steps": 200,
    "theory.alignment_seeds": [0],
    "theory.alignment_epochs": 20,
}


@dataclass
class AlgorithmicPart:
    """Appendix E.2 inside the report: one ``loopscape algorithmic`` run per task
    (all three paradigms). Off by default: a task takes minutes on 2 cores."""

    tasks: list[str] = field(default_factory=list)
    preset: str = "cpu-small"
    steps: int | None = None  # overrides the preset's training steps

    def validate(self, p: str = "") -> None:
        from loopscape.data.algorithmic import TASKS
        from loopscape.experiments.algorithmic import PRESETS

        require(all(t in TASKS for t in self.tasks), f"{p}tasks", f"a list from {TASKS}", self.tasks)
        require(self.preset in PRESETS, f"{p}preset", f"one of {PRESETS}", self.preset)
        require(self.steps is None or self.steps >= 1, f"{p}steps", "null or an integer >= 1", self.steps)


@dataclass
class ReproduceConfig:
    markov: MarkovStudyConfig = field(default_factory=MarkovStudyConfig)
    shift: sh.ShiftStudyConfig = field(default_factory=sh.ShiftStudyConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)
    algorithmic: AlgorithmicPart = field(default_factory=AlgorithmicPart)


def length_models(cfg: MarkovStudyConfig, shift_cfg: sh.ShiftStudyConfig, markov_out: Path, shift_out: Path) -> dict:
    """Final models per seed: Single-Attn and Looped-Attn of the Markov study, SHIFT with SCP."""
    from safetensors.torch import load_file

    from loopscape.training.population import load_member

    models = {}
    for name, T in cfg.models.items():
        ms = []
        for s in cfg.seeds:
            m = cfg.model.build(cfg.data.vocab_size, T)
            m.load_state_dict(load_file(str(run_dir_of(markov_out, name, s) / "model.safetensors")))
            ms.append(m.eval())
        models[name] = ms
    template = cfg.model.build(cfg.data.vocab_size, cfg.model.n_loops)
    shift_models = []
    for part in sorted((shift_out / "population").glob("part*")):
        for k, m in enumerate(read_json(part / "members.json")):
            if (m["policy"], m["optimizer"]) == (sh.SCP, shift_cfg.optimizer):
                T = cfg.model.n_loops if m["shift_epoch"] is not None else 1
                shift_models.append(load_member(part / "model.safetensors", template, k, T).eval())
    models["shift"] = shift_models
    return models


def _theory_verdicts(t: dict) -> list[dict]:
    rows = []
    for key, paper in (("Theorem 1", "Section 4.3"), ("Theorem 2", "Section 4.3")):
        r = t[key]
        ok = r["meeting_assumptions"] > 0 and r["held"] == r["meeting_assumptions"]
        rows.append({"claim": f"{key}: cumulative force bounded by C", "source": paper, "ours": f"held on {r['held']}/{r['meeting_assumptions']} instances meeting its assumptions", "paper": "proof", "verdict": "reproduced" if ok else "not reproduced"})
    checks = t["Corollaries 1-2"]["checks"]
    ratios = [c["C_ratio_to_U"] for c in checks.values()]
    ok = all(r > 1 for r in ratios) and all(c["final_loss_below_U"] and c["river_progress_beyond_U"] for c in checks.values())
    rows.append({"claim": "Corollaries 1-2: V valleys beat the U valley (force, river progress, loss)", "source": "Section 4.3", "ours": "C_V/C_U = " + " / ".join(f"{r:.3g}" for r in ratios), "paper": "C_V >> C_U", "verdict": "reproduced" if ok else "not reproduced"})
    a4 = [v for k, v in t["Theorem 3"]["summary"].items() if k.startswith("assumption-4")]
    frac = min(v["fraction_nonnegative"] for v in a4) if a4 else None
    rows.append({"claim": "Theorem 3: gradients of Single-Attn and Looped-Attn aligned (W_K, W_Q)", "source": "Section 5", "ours": f"non-negative at {frac:.0%} of Assumption-4 points" if frac is not None else "n/a", "paper": "proof", "verdict": "reproduced" if frac == 1.0 else "not reproduced"})
    return rows


def run_reproduce(cfg: ReproduceConfig, out: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    from loopscape.reporting import shift as rep
    from loopscape.reporting.html import Section, render_report, versions

    out = Path(out)
    prepare_output(out, cfg, resume)
    timings = {}

    def part_resume(folder: Path) -> bool:
        return resume and (folder / "config.yaml").exists()

    t0 = time.perf_counter()
    markov = run_markov_study(cfg.markov, out / "markov", resume=part_resume(out / "markov"), show_progress=show_progress)
    timings["markov_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if resume and (out / "theory" / "theory.json").exists():
        theory = read_json(out / "theory" / "theory.json")
    else:
        theory = run_theory(cfg.theory, out / "theory", show_progress=show_progress)
    timings["theory_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sh.train_shift(cfg.markov, cfg.shift, out / "shift", resume=resume, show_progress=show_progress)
    shift = sh.analyse_shift(cfg.markov, cfg.shift, out / "shift", out / "markov")
    write_json(out / "shift" / "shift.json", shift)
    timings["shift_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = read_json(out / "markov" / "data.json")
    models = length_models(cfg.markov, cfg.shift, out / "markov", out / "shift")
    length = sh.length_generalisation(cfg.markov, models, ic_threshold=data["ic_max"])
    timings["length_s"] = time.perf_counter() - t0

    figs = out / "figures"
    rep.plot_shift_points(shift, cfg.shift.optimizer, figs / "fig4_shift_points.png")
    rep.plot_compute_curves(shift, cfg.shift.optimizer, figs / "shift_compute_curves.png")
    rep.plot_length(length, figs / "fig9_length_generalisation.png")
    shift_md, shift_verdicts = rep.shift_markdown(shift, length, cfg.shift, cfg.markov.data.length)

    verdicts = [
        {"claim": "Observation 1: Looped-Attn keeps learning high-IC sequences after epoch 150, Single-Attn stalls", "source": "Section 4.1",
         "ours": f"delta {markov['observation1']['delta_mean_pts']:+.2f} ± {markov['observation1']['delta_std_pts']:.2f} pts", "paper": "+10.07 pts", "verdict": markov["observation1"]["verdict"]},
    ]
    if "observation2" in markov:
        verdicts.append({"claim": "Observation 2: Single-Attn's Hessian static; Looped-Attn's collapses, diversifies, stabilises", "source": "Section 4.1",
                         "ours": f"collapse {markov['observation2']['looped_collapse']}, diversification {markov['observation2']['looped_diversification']}", "paper": "Figures 3c, 3d", "verdict": markov["observation2"]["verdict"]})
        a1 = markov["landscape"]["assumption1"]
        if a1:
            holds = [a["holds"] for a in a1.values()]
            verdicts.append({"claim": "Assumption 1: Looped-Attn has more low-curvature directions (V-valley)", "source": "Section 4.2",
                             "ours": ", ".join(f"epoch {e}: m {a['m_single']} vs {a['m_looped']}" for e, a in a1.items()), "paper": "assumed", "verdict": "holds" if all(holds) else "fails"})
    verdicts += _theory_verdicts(theory)
    sv = shift_verdicts
    verdicts += [
        {"claim": "SCP shifts at 100-150 epochs", "source": "Section 5", "ours": f"median {sv['scp_shift_point']['median']}", "paper": "100-150", "verdict": sv["scp_shift_point"]["verdict"]},
        {"claim": "SHIFT reaches Looped-Attn's accuracy faster, at no loss", "source": "Section 5, Figure 4",
         "ours": f"{rep._f(sv['shift_speedup']['wall_speedup_total'])}x wall time, {rep._f(sv['shift_speedup']['acc_all_minus_looped_pts'])} pts", "paper": "about 1.26x, no loss", "verdict": sv["shift_speedup"]["verdict"]},
        {"claim": "Looped-Attn generalises to longer sequences better than Single-Attn", "source": "Section 4.4, Figure 9, Table 1",
         "ours": ", ".join(f"L={L}: {w['diff_pts']:+.1f} pts" for L, w in sv["length_generalisation"]["per_length"].items()), "paper": "Looped-Attn above at every length", "verdict": sv["length_generalisation"]["verdict"]},
    ]
    algo_sections = []
    for task in cfg.algorithmic.tasks:
        from loopscape.experiments.algorithmic import AlgorithmicConfig, preset, run_algorithmic
        from loopscape.reporting.algorithmic import algorithmic_section

        t0 = time.perf_counter()
        folder = out / "algorithmic" / task
        settings = preset(cfg.algorithmic.preset, task)
        if cfg.algorithmic.steps is not None:
            settings["train"]["steps"] = cfg.algorithmic.steps
        results = run_algorithmic(from_dict(AlgorithmicConfig, settings), folder, resume=resume and folder.exists(), show_progress=show_progress)
        section, rows = algorithmic_section(folder, results, anchor=f"algorithmic-{task}")
        algo_sections.append(section)
        verdicts += rows
        timings[f"algorithmic_{task}_s"] = time.perf_counter() - t0
    theory_md = (out / "theory" / "theory.md").read_text()
    mf, tf = out / "markov" / "figures", out / "theory" / "figures"
    sections = [
        Section("markov", "Sample level and Hessian", (out / "markov" / "summary.md").read_text(), [
            (mf / "fig3a_ic_distribution.png", "Figure 3a: IC distribution of the training set"),
            (mf / "fig3b_accuracy.png", "Figure 3b: training accuracy on low / high IC sequences"),
            (mf / "fig3cd_entropy_mutual_information.png", "Figures 3c, 3d: Matrix Entropy and Mutual Information of the Hessian"),
            (mf / "fig9bc_eigenspectra.png", "Figures 9b, 9c: eigenspectrum snapshots"),
        ]),
        Section("theory", "Theory", theory_md, [
            (tf / "river_u_v_valleys.png", "River-U-Valley and River-V-Valley (illustration)"),
            (tf / "corollaries_river_progress.png", "Corollaries 1-2: river progress and loss, U against V valleys"),
            (tf / "theorem2_river_progress.png", "Theorem 2 (b): the same in Setting 2"),
            (tf / "theorem3_cosines.png", "Theorem 3: gradient cosines"),
        ]),
        Section("shift", "SHIFT and length generalisation", shift_md, [
            (figs / "fig4_shift_points.png", "Figure 4: speed-up and final accuracy against the shift epoch (stars: SCP)"),
            (figs / "shift_compute_curves.png", "Accuracy against cumulative compute"),
            (figs / "fig9_length_generalisation.png", "Figure 9: total accuracy against sequence length"),
        ]),
        *algo_sections,
    ]
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    vers = versions()
    lead = (
        "Reproduction of the Markov-language experiments of 'What makes looped transformers perform better than non-recursive ones' "
        f"(Single-Attn vs Looped-Attn, the River-Valley theory, SHIFT). Seeds {cfg.markov.seeds}; data seed {cfg.markov.data.seed}. "
        "Every verdict follows a rule stated in its section; numbers are mean ± std over seeds."
    )
    page = render_report("loopscape: Markov-language reproduction", lead, verdicts, sections, config_yaml, vers)
    atomic_write_text(out / "report.html", page)
    report = {
        "verdicts": verdicts,
        "config": to_dict(cfg),
        "versions": vers,
        "timings_s": timings,
        "markov": {k: v for k, v in markov.items() if k != "hessian_curves"},
        "theory": _without_long_lists(theory),
        "shift": {k: v for k, v in shift.items() if k not in ("curves", "cumulative")},
        "shift_verdicts": shift_verdicts,
        "length_generalisation": length,
    }
    write_json(out / "report.json", report)
    return report


def _without_long_lists(theory: dict) -> dict:
    """Theory results without the per-step curves (they are in theory/theory.json)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not (isinstance(v, list) and len(v) > 50)}
        return x

    return strip(theory)


def quick_config() -> ReproduceConfig:
    from loopscape.config import load_config

    return load_config(ReproduceConfig, overrides=QUICK)

