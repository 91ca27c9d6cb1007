"""Length generalisation on the Markov language (Section 4.4, Appendix E.1.3,
Figure 9, Table 1): trained models read sequences longer than the training
length, whose targets the transitions make cyclically.

:func:`run_length_readings` repeats Table 1 under the readings the paper
leaves open: attention with or without ``1/n``, three ways to code positions
past the training length, and test targets made by the cyclic transition or
aligned with the training targets'.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from loopscape.data.markov import TEST_TARGETS, MarkovLanguage, SequenceSet, build_task
from loopscape.experiments.markov import MarkovStudyConfig, final_models, train_all
from loopscape.io import atomic_write_text, prepare_run_folder, write_json
from loopscape.reporting import length as length_report
from loopscape.reporting.html import Section, StudyReport
from loopscape.reporting.stats import mean_std


def test_language(lang: MarkovLanguage, cfg: MarkovStudyConfig, length: int) -> MarkovLanguage:
    """The law of the test set at ``length``: the language, or with ``data.test_targets: aligned`` its
    transitions rotated so the last is the training targets' (:meth:`MarkovLanguage.aligned`)."""
    return lang.aligned(length) if cfg.data.test_targets == "aligned" else lang


def test_sets(lang: MarkovLanguage, cfg: MarkovStudyConfig) -> dict[int, SequenceSet]:
    """``N_test`` tilted draws at every test length, each from its own fixed seed."""
    return {
        L: test_language(lang, cfg, L).sample_set(
            cfg.data.n_test, cfg.data.alpha, L, np.random.default_rng([cfg.data.seed, L])
        )
        for L in cfg.data.test_lengths
    }


def bayes_prediction(lang: MarkovLanguage, inputs: torch.Tensor) -> torch.Tensor:
    """The Bayes-optimal next token at any length: ``argmax_y T_k[x_last, y]`` for the
    transition ``k`` that produces the target (the tilt does not move an argmax)."""
    k = inputs.shape[1]  # the target is token k (0-based), made by transition k
    return torch.from_numpy(lang.transition(k).argmax(axis=1))[inputs[:, -1]]


def length_generalisation(
    cfg: MarkovStudyConfig, models: dict[str, list[torch.nn.Module]], ic_threshold: float
) -> dict:
    """Table 1 and Figure 9: total accuracy and accuracy on 'simple' sequences
    (IC <= ``ic_threshold``, the largest training IC) at every test length."""
    lang, task = build_task(cfg.data)
    sets = {cfg.data.length: task.train, **test_sets(lang, cfg)}
    result = {}
    for L, s in sets.items():
        simple = s.ic <= ic_threshold
        bayes = (bayes_prediction(test_language(lang, cfg, L), s.inputs) == s.targets).float()
        row = {
            "n": len(s),
            "simple_share": float(simple.float().mean()),
            "bayes_all": float(bayes.mean()),
            "bayes_simple": float(bayes[simple].mean()) if simple.any() else None,
        }
        for name, ms in models.items():
            with torch.no_grad():
                correct = torch.stack([(m(s.inputs).argmax(-1) == s.targets).float() for m in ms])  # (seeds, n)
            row[name] = {
                "all": mean_std((100 * correct.mean(1)).tolist()),
                "simple": mean_std((100 * correct[:, simple].mean(1)).tolist()) if simple.any() else None,
            }
        result[str(L)] = row
    return result


def run_length_study(
    cfg: MarkovStudyConfig,
    models: dict[str, list[torch.nn.Module]],
    ic_threshold: float,
    figures: Path,
    note: str = "",
) -> StudyReport:
    """Score ``models`` (name -> one model per seed) at every test length; Figure 9 into ``figures``.
    ``note`` is added to the section (e.g. SHIFT runs scored as Single-Attn)."""
    results = length_generalisation(cfg, models, ic_threshold)
    verdict = length_report.length_verdict(results, cfg.data.length)
    length_report.plot_length(results, figures / "fig9_length_generalisation.png")
    markdown = length_report.length_markdown(
        results, cfg.data.length, verdict, cfg.data.alpha, cfg.model.positions, cfg.model.max_len
    )
    if note:
        markdown += f"\n{note}\n"
    section = Section(
        "length",
        "Length generalisation",
        markdown,
        [
            (figures / "fig9_length_generalisation.png", "Figure 9: total accuracy against sequence length"),
        ],
    )
    return StudyReport(results, [length_report.verdict_row(verdict)], section, memory={"verdict": verdict})


# -- Table 1 under the open readings ----------------------------------------------------------------

ATTENTION_READINGS = ("sum", "mean")  # f as the paper writes it, or divided by the input length n
POSITION_READINGS = ("cyclic", "absolute", "none")


def reading_config(cfg: MarkovStudyConfig, attention: str, positions: str) -> MarkovStudyConfig:
    """The study ``cfg`` with its toy model read one way (Hessian tracking off: only accuracies are read).

    ``positions``: ``cyclic``, one code per training input position reused
    cyclically; ``absolute``, one code per position up to the longest test input;
    ``none``, no position code at all (the token one-hot alone).
    """
    model = replace(cfg.model, normalise_by_length=attention == "mean")
    if positions == "cyclic":
        model = replace(model, positions="cyclic", max_len=cfg.data.length - 1)
    elif positions == "absolute":
        model = replace(model, positions="absolute", max_len=max(cfg.data.test_lengths) - 1)
    else:
        model = replace(model, embedding="token")
    return replace(cfg, model=model, hessian=replace(cfg.hessian, enabled=False))


def run_length_readings(
    cfg: MarkovStudyConfig,
    out: Path,
    resume: bool = False,
    show_progress: bool = True,
    study_models: dict[str, list[torch.nn.Module]] | None = None,
) -> StudyReport:
    """Table 1 under every reading: Single-Attn and Looped-Attn trained for each
    (attention, positions) pair in ``out/<attention>-<positions>/`` (``cfg.seeds``
    each), each scored on cyclic and on aligned test targets. ``study_models``:
    models already trained with ``cfg.model`` (the main study's), reused for the
    reading that is ``cfg.model``. 'Simple' sequences are those with IC at most the largest training IC."""
    prepare_run_folder(out, cfg, resume)
    ic_threshold = build_task(cfg.data)[1].train.ic.max().item()
    rows = []
    for attention in ATTENTION_READINGS:
        for positions in POSITION_READINGS:
            rcfg = reading_config(cfg, attention, positions)
            models = study_models if study_models is not None and rcfg.model == cfg.model else None
            if models is None:
                folder = out / f"{attention}-{positions}"
                folder.mkdir(exist_ok=True)
                train_all(rcfg, folder, resume=resume, show_progress=show_progress)
                models = final_models(folder, rcfg)
            models = {k: v for k, v in models.items() if k in ("single_attn", "looped_attn")}
            for targets in TEST_TARGETS:
                tcfg = replace(rcfg, data=replace(rcfg.data, test_targets=targets))
                result = length_generalisation(tcfg, models, ic_threshold)
                verdict = length_report.length_verdict(result, cfg.data.length)
                rows.append(
                    {
                        "attention": attention,
                        "positions": positions,
                        "test_targets": targets,
                        "default": rcfg.model == cfg.model and targets == cfg.data.test_targets,
                        "length": result,
                        "verdict": verdict,
                    }
                )
    markdown = length_report.readings_markdown(rows, cfg.data.length, cfg.seeds)
    section = Section("length-readings", "Table 1 under open readings", markdown)
    atomic_write_text(out / "length_readings.md", markdown)
    write_json(out / "length_readings.json", {"readings": rows})
    return StudyReport({"readings": rows}, [], section)
