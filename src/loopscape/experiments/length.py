"""Length generalisation on the Markov language (Section 4.4, Appendix E.1.3,
Figure 9, Table 1): trained models read sequences longer than the training
length, whose targets the transitions make cyclically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loopscape.data.markov import MarkovLanguage, SequenceSet, build_task
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.reporting import length as length_report
from loopscape.reporting.html import Section, StudyReport
from loopscape.reporting.stats import mean_std


def test_sets(lang: MarkovLanguage, cfg: MarkovStudyConfig) -> dict[int, SequenceSet]:
    """``N_test`` tilted draws at every test length, each from its own fixed seed."""
    return {
        L: lang.sample_set(cfg.data.n_test, cfg.data.alpha, L, np.random.default_rng([cfg.data.seed, L]))
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
        bayes = (bayes_prediction(lang, s.inputs) == s.targets).float()
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
