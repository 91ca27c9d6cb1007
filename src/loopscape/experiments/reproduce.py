"""`loopscape reproduce`: the whole Markov section of the paper in one run.

Each study returns its numbers, its verdicts and its report section
(:class:`~loopscape.reporting.html.StudyReport`); this module runs them in
order, hands each what it needs from the ones before, and composes the report::

    OUT/config.yaml        the resolved configuration
    OUT/markov/            `loopscape markov`'s run folder (Section 4.1)
    OUT/theory/            `loopscape theory`'s output (Sections 4.2-4.3, 5)
    OUT/shift/             the SHIFT study: population runs, shift.json, figures (Section 5, Figure 4)
    OUT/figures/           Figure 9 (length generalisation, Section 4.4, Table 1)
    OUT/length-readings/   Table 1 under open readings: one training per model reading (``length_readings``)
    OUT/algorithmic/<task>/  optional: Appendix E.2 per task
    OUT/report.html, OUT/report.json

Every part resumes (``resume=True``): finished runs are kept, unfinished ones
continue from their checkpoints, and the report is rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from loopscape.config import require, to_dict
from loopscape.data.algorithmic import TASKS
from loopscape.experiments.algorithmic import PRESETS, algorithmic_preset, run_algorithmic_study
from loopscape.experiments.length import run_length_readings, run_length_study
from loopscape.experiments.markov import MarkovStudyConfig, final_models, run_markov_study
from loopscape.experiments.shift import ShiftStudyConfig, run_shift_study
from loopscape.experiments.theory import TheoryStudyConfig, run_theory
from loopscape.io import atomic_write_text, prepare_run_folder, write_json
from loopscape.reporting.html import NOT_TESTED, render_report, versions
from loopscape.reporting.verdicts import rules_version


@dataclass
class AlgorithmicPartConfig:
    """Appendix E.2 inside the report: one ``loopscape algorithmic`` run per task
    (all three paradigms). Off by default: a task takes minutes on 2 cores."""

    tasks: list[str] = field(default_factory=list)
    preset: str = "cpu-small"
    steps: int | None = None  # overrides the preset's training steps

    def validate(self, p: str = "") -> None:
        require(all(t in TASKS for t in self.tasks), f"{p}tasks", f"a list from {TASKS}", self.tasks)
        require(self.preset in PRESETS, f"{p}preset", f"one of {PRESETS}", self.preset)
        require(self.steps is None or self.steps >= 1, f"{p}steps", "null or an integer >= 1", self.steps)


SCALES = ("full", "quick")


@dataclass
class ReproduceConfig:
    """Every study of the report. ``scale``: ``quick`` (``--quick``) says so at the top of the report."""

    markov: MarkovStudyConfig = field(default_factory=MarkovStudyConfig)
    shift: ShiftStudyConfig = field(default_factory=ShiftStudyConfig)
    theory: TheoryStudyConfig = field(default_factory=TheoryStudyConfig)
    algorithmic: AlgorithmicPartConfig = field(default_factory=AlgorithmicPartConfig)
    length_readings: bool = True  # Table 1 again under the readings the paper leaves open (5 more trainings)
    scale: str = "full"

    def validate(self, p: str = "") -> None:
        require(self.scale in SCALES, f"{p}scale", f"one of {SCALES}", self.scale)


def run_reproduce(cfg: ReproduceConfig, out: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Every study, then ``report.html`` and ``report.json``; returns the latter's content."""
    out = Path(out)
    prepare_run_folder(out, cfg, resume)
    timings = {}

    def timed(name: str, run, *args, **kwargs):
        t0 = time.perf_counter()
        result = run(*args, **kwargs)
        timings[f"{name}_s"] = time.perf_counter() - t0
        return result

    def part_resume(folder: Path) -> bool:
        return resume and (folder / "config.yaml").exists()

    progress = {"show_progress": show_progress}
    markov = timed("markov", run_markov_study, cfg.markov, out / "markov", part_resume(out / "markov"), **progress)
    theory = timed("theory", run_theory, cfg.theory, out / "theory", resume=resume, study=cfg.markov, **progress)
    metrics = markov.memory["metrics"]
    shift = timed("shift", run_shift_study, cfg.markov, cfg.shift, out / "shift", metrics, resume, **progress)
    models = {**final_models(out / "markov", cfg.markov), "shift": shift.memory["scp_models"]}
    ic_max = markov.memory["data"]["ic_max"]
    never = shift.memory["scp_never_shifted"]
    note = (
        f"SHIFT (SCP) never shifted on {never} seed(s): those runs are Single-Attn and are scored as such."
        if never
        else ""
    )
    length = timed("length", run_length_study, cfg.markov, models, ic_max, out / "figures", note)
    readings = []
    if cfg.length_readings:
        folder = out / "length-readings"
        readings.append(
            timed(
                "length_readings",
                run_length_readings,
                cfg.markov,
                folder,
                part_resume(folder),
                study_models=models,
                **progress,
            )
        )
    algorithmic = []
    for task in cfg.algorithmic.tasks:
        config = algorithmic_preset(cfg.algorithmic.preset, task, steps=cfg.algorithmic.steps)
        folder = out / "algorithmic" / task
        algorithmic.append(
            timed(f"algorithmic_{task}", run_algorithmic_study, config, folder, resume and folder.exists(), **progress)
        )

    studies = [markov, theory, shift, length, *readings, *algorithmic]
    verdicts = [v for study in studies for v in study.verdicts]
    lead = scale_notice(cfg.scale, verdicts) + (
        "Reproduction of the Markov-language experiments of 'What makes looped transformers perform better than "
        "non-recursive ones' "
        f"(Single-Attn vs Looped-Attn, the River-Valley theory, SHIFT). Seeds {cfg.markov.seeds}; data seed "
        f"{cfg.markov.data.seed}. "
        "Every verdict is a test over seeds stated before the outcome (reporting/verdicts.py: the statistic, its "
        "90% interval, p, the seeds, the rule's false-positive rate and the smallest effect it detects are in the "
        "table); numbers are mean ± std over seeds."
    )
    vers = versions()
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    page = render_report(
        "loopscape: Markov-language reproduction", lead, verdicts, [s.section for s in studies], config_yaml, vers
    )
    atomic_write_text(out / "report.html", page)
    report = {
        "verdicts": verdicts,
        "rules": rules_version(),
        "config": to_dict(cfg),
        "versions": vers,
        "timings_s": timings,
        "markov": {k: v for k, v in markov.results.items() if k != "hessian_curves"},
        "theory": _without_long_lists(theory.results),
        "shift": {k: v for k, v in shift.results.items() if k not in ("curves", "cumulative")},
        "shift_verdicts": {**shift.memory["verdicts"], "length_generalisation": length.memory["verdict"]},
        "length_generalisation": length.results,
    }
    if readings:
        report["length_readings"] = readings[0].results["readings"]
    write_json(out / "report.json", report)
    return report


def scale_notice(scale: str, verdicts: list[dict]) -> str:
    """What the top of the report says first: a quick run, and how many claims were not tested."""
    notice = ""
    if scale == "quick":
        notice += (
            "Quick run (--quick): every part on a small scale. Its numbers are not comparable to the paper's, "
            "and claims its runs are too short to judge are not tested. "
        )
    untested = sum(v["verdict"] == NOT_TESTED for v in verdicts)
    if untested:
        notice += f"Partial: {untested} of {len(verdicts)} claims not tested (the table says why). "
    return notice


def _without_long_lists(theory: dict) -> dict:
    """Theory results without the per-step curves (they are in theory/theory.json)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not (isinstance(v, list) and len(v) > 50)}
        return x

    return strip(theory)


LANGUAGE_POOL = range(400)  # the seeds `loopscape languages` ranks by default


def run_over_languages(
    cfg: ReproduceConfig, out: str | Path, k: int, resume: bool = False, show_progress: bool = True
) -> dict:
    """``loopscape reproduce --languages K``: the whole report on each of the ``k`` best-fitting eligible
    languages (:func:`~loopscape.data.languages.rank_languages` over seeds 0..399, by the rule alone), in
    ``OUT/language-<seed>/``, and the verdicts as a distribution over languages (``OUT/languages.md``,
    ``OUT/languages.json``). Every Markov verdict of one report is one language's; this shows how far each
    depends on which language the rule picked."""
    from loopscape.data.languages import rank_languages

    require(isinstance(k, int) and k >= 1, "languages", "an integer >= 1", k)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranked = [r for r in rank_languages(cfg.markov.data, LANGUAGE_POOL) if r["eligible"]][:k]
    reports = {}
    for r in ranked:
        seed = r["seed"]
        lang_cfg = replace(cfg, markov=replace(cfg.markov, data=replace(cfg.markov.data, seed=seed)))
        folder = out / f"language-{seed}"
        reports[seed] = run_reproduce(lang_cfg, folder, resume and folder.exists(), show_progress)
    claims = list(dict.fromkeys(v["claim"] for rep in reports.values() for v in rep["verdicts"]))
    table = {
        c: {
            seed: next((v["verdict"] for v in rep["verdicts"] if v["claim"] == c), None)
            for seed, rep in reports.items()
        }
        for c in claims
    }
    lines = [
        f"# Verdicts over the {len(reports)} best-fitting eligible languages",
        "",
        "Languages ranked by the data-facts rule alone (loopscape languages; no model outcome), the best "
        f"{len(reports)} eligible ones each run through the whole report. One column per language (data seed; "
        "share error in points).",
        "",
        "| claim | "
        + " | ".join(
            f"{r['seed']} ({'-' if r['share_error_pts'] is None else format(r['share_error_pts'], '.2f')})"
            for r in ranked
        )
        + " | distribution |",
        "|---" * (len(ranked) + 2) + "|",
    ]
    for c, row in table.items():
        words = [w for w in row.values() if w is not None]
        counts = ", ".join(f"{w}: {words.count(w)}" for w in dict.fromkeys(words))
        lines.append(f"| {c} | " + " | ".join(str(row[r["seed"]] or "-") for r in ranked) + f" | {counts} |")
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "languages.md", markdown)
    result = {"languages": [r["seed"] for r in ranked], "verdicts": table, "markdown": markdown}
    write_json(out / "languages.json", {k: v for k, v in result.items() if k != "markdown"})
    return result
