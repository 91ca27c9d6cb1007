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

import torch

from loopscape.data.markov import TEST_TARGETS, build_task, test_sets
from loopscape.experiments.markov import MarkovStudyConfig, final_models, train_all
from loopscape.io import atomic_write_text, prepare_run_folder, write_json
from loopscape.reporting import length as length_report
from loopscape.reporting.figures import plot_test_ic
from loopscape.reporting.html import Section, StudyReport
from loopscape.reporting.stats import mean_std


def length_generalisation(
    cfg: MarkovStudyConfig, models: dict[str, list[torch.nn.Module]], ic_threshold: float
) -> dict:
    """Table 1 and Figure 9: total accuracy and accuracy on 'simple' sequences
    (IC <= ``ic_threshold``, the largest training IC) at every test length."""
    lang, task = build_task(cfg.data)
    sets = {cfg.data.length: task.train, **test_sets(lang, cfg.data)}
    result = {}
    for L, s in sets.items():
        simple = s.ic <= ic_threshold
        bayes = (lang.test_law(L, cfg.data.test_targets).bayes_prediction(s.inputs) == s.targets).float()
        row = {
            "n": len(s),
            "simple_share": float(simple.float().mean()),
            "bayes_all": float(bayes.mean()),  # the Bayes-optimal rule on this sample
            "bayes_simple": float(bayes[simple].mean()) if simple.any() else None,
            "bayes_exact": lang.test_law(L, cfg.data.test_targets).bayes_accuracy(cfg.data.alpha, L),
        }
        for name, ms in models.items():
            with torch.no_grad():
                logits = [m(s.inputs, all_loops=True) for m in ms]  # (n, T, V) per seed: every loop's readout
            correct = torch.stack([(lg[:, -1].argmax(-1) == s.targets).float() for lg in logits])  # (seeds, n)
            row[name] = {
                "all": mean_std((100 * correct.mean(1)).tolist()),
                "all_per_seed": (100 * correct.mean(1)).tolist(),
                "simple": mean_std((100 * correct[:, simple].mean(1)).tolist()) if simple.any() else None,
                # the literal equations grow with n over the loops: the largest |logit| shows it
                "max_abs_logit": [float(lg[:, -1].abs().max()) for lg in logits],
                # accuracy read after loop t = 1..T (the same weights; loop T is the model's own output)
                "per_loop_all": [
                    mean_std([100 * float((lg[:, t].argmax(-1) == s.targets).float().mean()) for lg in logits])
                    for t in range(logits[0].shape[1])
                ],
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
    lang, task = build_task(cfg.data)
    plot_test_ic({cfg.data.length: task.train, **test_sets(lang, cfg.data)}, ic_threshold, figures / "fig7_test_ic.png")
    markdown = length_report.length_markdown(
        results,
        cfg.data.length,
        verdict,
        cfg.data.alpha,
        cfg.model.positions,
        cfg.model.max_len,
        cfg.data.test_targets,
    )
    if note:
        markdown += f"\n{note}\n"
    section = Section(
        "length",
        "Length generalisation",
        markdown,
        [
            (figures / "fig7_test_ic.png", "Figure 7: IC distributions of the test sets by length"),
            (figures / "fig9_length_generalisation.png", "Figure 9: total accuracy against sequence length"),
        ],
    )
    return StudyReport(results, [length_report.verdict_row(verdict)], section, memory={"verdict": verdict})


# -- Table 1 under the open readings ----------------------------------------------------------------

ATTENTION_READINGS = ("sum", "mean")  # f as the paper writes it, or divided by the input length n
POSITION_READINGS = ("cyclic_end", "cyclic", "absolute", "none")
# position readings that train the same model: at the training length the codes agree (n = max_len)
TRAINED_AS = {"cyclic_end": "cyclic"}


def reading_config(cfg: MarkovStudyConfig, attention: str, positions: str) -> MarkovStudyConfig:
    """The study ``cfg`` with its toy model read one way (Hessian tracking off: only accuracies are read).

    ``positions``: ``cyclic_end``, one code per training input position counted
    cyclically from the end (the query keeps its training code); ``cyclic``, the same
    codes counted from the start; ``absolute``, one code per position up to the
    longest test input; ``none``, no position code at all (the token one-hot alone).
    """
    model = replace(cfg.model, normalise_by_length=attention == "mean")
    if positions in ("cyclic", "cyclic_end"):
        model = replace(model, positions=positions, max_len=cfg.data.length - 1)
    elif positions == "absolute":
        model = replace(model, positions="absolute", max_len=max(cfg.data.test_lengths) - 1)
    else:
        model = replace(model, embedding="token")
    return replace(cfg, model=model, hessian=replace(cfg.hessian, enabled=False))


def _trained_as(model):
    return replace(model, positions=TRAINED_AS.get(model.positions, model.positions))


def _read_as(models: dict[str, list[torch.nn.Module]], rcfg: MarkovStudyConfig) -> dict[str, list[torch.nn.Module]]:
    """The trained weights of ``models`` in ``rcfg``'s model (the same weights read with other position codes)."""
    out = {}
    for name in ("single_attn", "looped_attn"):
        out[name] = []
        for m in models[name]:
            read = rcfg.build_model(rcfg.models[name])
            read.load_state_dict(m.state_dict())
            out[name].append(read.eval())
    return out


def run_length_readings(
    cfg: MarkovStudyConfig,
    out: Path,
    resume: bool = False,
    show_progress: bool = True,
    study_models: dict[str, list[torch.nn.Module]] | None = None,
) -> StudyReport:
    """Table 1 under every reading: Single-Attn and Looped-Attn trained for each
    (attention, positions) pair in ``out/<attention>-<positions>/`` (``cfg.seeds``
    each; position codes counted from the end train the same model as from the start,
    so they share its folder), each scored on aligned and on cyclic test targets.
    ``study_models``: models already trained with ``cfg.model`` (the main study's), reused
    for the readings that train it. 'Simple' sequences are those with IC at most the largest training IC."""
    prepare_run_folder(out, cfg, resume)
    ic_threshold = build_task(cfg.data)[1].train.ic.max().item()
    rows = []
    for attention in ATTENTION_READINGS:
        for positions in POSITION_READINGS:
            rcfg = reading_config(cfg, attention, positions)
            reuse = study_models is not None and _trained_as(rcfg.model) == _trained_as(cfg.model)
            if reuse:
                models = study_models
            else:
                trained = reading_config(cfg, attention, TRAINED_AS.get(positions, positions))
                folder = out / f"{attention}-{TRAINED_AS.get(positions, positions)}"
                folder.mkdir(exist_ok=True)
                train_all(trained, folder, resume=resume, show_progress=show_progress)
                models = final_models(folder, trained)
            models = _read_as(models, rcfg)
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
    verdict = length_report.readings_verdict(rows)
    markdown = length_report.readings_markdown(rows, cfg.data.length, cfg.seeds, verdict)
    section = Section("length-readings", "Table 1 under open readings", markdown)
    atomic_write_text(out / "length_readings.md", markdown)
    write_json(out / "length_readings.json", {"readings": rows, "verdict": verdict})
    return StudyReport({"readings": rows, "verdict": verdict}, [length_report.readings_row(verdict, rows)], section)
