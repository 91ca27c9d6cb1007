"""The retrofit study's verdicts and section (Appendix B: recursion introduced into a trained decoder)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from loopscape.reporting.html import NOT_TESTED, verdict_row
from loopscape.reporting.stats import mean_sd_se
from loopscape.reporting.verdicts import directional, non_inferiority

VARIANT_NAMES = {  # the variant arms of SHIFT from a trained model, and what each changes
    "shift-plnorm": "a Poisson-log-normal depth per step",
    "shift-k1": "truncated backprop, last loop",
    "shift-k2": "truncated backprop, last 2 loops",
    "shift-concat": "learned concat injection",
    "shift-lora": "per-loop LoRA",
}
GAP_PTS = 5.0  # "matches": within this many points of the looped-from-scratch arm


def verdicts(runs: dict[int, dict]) -> list[dict]:
    """The rule: SHIFT from a trained model **holds** if, past the training length, its mean
    accuracy over seeds is at most ``GAP_PTS`` points below the looped-from-scratch arm's and it
    spent fewer FLOPs; **fails** otherwise; **not tested** with fewer than 2 seeds. One row for
    ``shift``, and one by the same rule for each variant arm run (:data:`VARIANT_NAMES`)."""
    source = "Appendix B"
    paper = "proposed, no numbers given"
    arms = [a for a in next(iter(runs.values())) if a == "shift" or a in VARIANT_NAMES]
    rows = []
    for arm in arms:
        claim = "Retrofitting recursion into a trained model reaches the looped model's accuracy for less compute"
        if arm != "shift":
            claim += f" ({arm}: {VARIANT_NAMES[arm]})"
        if len(runs) < 2:
            rows.append(verdict_row(claim, source, "one seed: no spread to judge by", paper, NOT_TESTED))
            continue
        gap = mean_sd_se([r[arm]["past"] - r["scratch"]["past"] for r in runs.values()])
        ratio = mean_sd_se([r["scratch"]["flops"] / r[arm]["flops"] for r in runs.values()])
        holds = gap["mean"] >= -GAP_PTS and ratio["mean"] > 1
        ours = (
            f"past the training length {arm} minus scratch {gap['mean']:+.1f} pts (se {gap['se']:.1f}); "
            f"scratch / {arm} FLOPs {ratio['mean']:.2f}x"
        )
        rows.append(verdict_row(claim, source, ours, paper, "holds" if holds else "fails"))
    return rows


def markdown(cfg, runs: dict[int, dict], rows: list[dict], metric: str) -> str:
    """The study's section: per-seed and mean accuracy and FLOPs of every arm, compute to reach, verdicts
    (``cfg``: the study's ``RetrofitConfig``; ``metric``: what accuracy means for its data)."""
    a, b = cfg.loop_layers
    lines = [
        "# Retrofit: recursion into a trained model (Appendix B)",
        "",
        (
            f"Text file {cfg.data_path}, characters as tokens, trained on windows of {cfg.text_context}, tested "
            f"on held-out windows of {cfg.text_context} (within) and {2 * cfg.text_context} (past: its positions "
            f"beyond {cfg.text_context})"
            if cfg.data_path is not None
            else f"Task {cfg.task}, training lengths 1..{cfg.train_max_len}, tested at {cfg.test_lengths[0]}.."
            f"{cfg.test_lengths[-1]}"
        )
        + f". A Llama-layout decoder, d = {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads, RoPE. Stage I: {cfg.stage1_steps} steps, one loop. Then "
        f"{cfg.stage2_steps} more steps per arm: **plain** continues as it is; **shift** loops layers "
        f"{a}..{b - 1} {cfg.n_loops} times (injection: {cfg.injection}) and continues; **scratch** is the "
        f"looped model trained from its initialisation for all {cfg.stage1_steps + cfg.stage2_steps} steps. "
        f"Seeds {cfg.seeds}. Accuracy: {metric}, %; FLOPs and wall time include Stage I.",
        "",
        *(
            [
                "Variants, each SHIFT from the same trained model with the shift arm's settings but: "
                + "; ".join(f"**{a}**: {VARIANT_NAMES[a]}" for a in cfg.arms if a in VARIANT_NAMES)
                + f" (Poisson-log-normal: mean {cfg.n_loops}, at most {2 * cfg.n_loops} loops, tested at "
                f"{cfg.n_loops}; LoRA rank {cfg.lora_rank} on every linear layer of the range).",
                "",
            ]
            if any(a in VARIANT_NAMES for a in cfg.arms)
            else []
        ),
        "| seed | arm | within training lengths | past them | training FLOPs | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for seed, run in runs.items():
        for arm in ("stage1", *cfg.arms):
            r = run[arm]
            past = "-" if r["past"] is None else f"{r['past']:.1f}"
            lines.append(f"| {seed} | {arm} | {r['within']:.1f} | {past} | {r['flops']:.3g} | {r['time_s']:.0f} s |")
    lines += ["", "| arm | within (mean, sd) | past (mean, sd) | FLOPs (mean) |", "|---|---|---|---|"]
    for arm in cfg.arms:
        w = mean_sd_se([r[arm]["within"] for r in runs.values()])
        p = mean_sd_se([r[arm]["past"] for r in runs.values()]) if cfg.train_max_len < max(cfg.test_lengths) else None
        past = "-" if p is None else f"{p['mean']:.1f}{_sd(p)}"
        flops = sum(r[arm]["flops"] for r in runs.values()) / len(runs)
        lines.append(f"| {arm} | {w['mean']:.1f}{_sd(w)} | {past} | {flops:.3g} |")
    reach = [
        f"seed {seed}: {r['shift_flops_to_scratch_final'] / r['scratch']['flops']:.2f}x"
        if r["shift_flops_to_scratch_final"] is not None
        else f"seed {seed}: never"
        for seed, r in runs.items()
    ]
    lines += [
        "",
        "Compute SHIFT from the trained model spent (Stage I included) until its accuracy past the training "
        "length first reached the scratch arm's final one, as a share of the scratch arm's compute (read every "
        f"{cfg.eval_every} steps): " + "; ".join(reach) + ".",
        "",
        *(
            f"- Verdict, {arm}: **{row['verdict']}** ({row['ours']})."
            for arm, row in zip([a for a in cfg.arms if a == "shift" or a in VARIANT_NAMES], rows)
        ),
        "",
        f"Rule: SHIFT from a trained model holds if, past the training length, its mean accuracy over seeds is at "
        f"most {GAP_PTS:g} points below the looped-from-scratch arm's and it spent fewer FLOPs; it fails otherwise; "
        "not tested with fewer than 2 seeds.",
    ]
    return "\n".join(lines)


def _sd(stats: dict) -> str:
    return "" if stats["sd"] is None else f" ({stats['sd']:.1f})"


# -- retrofitted recurrence on a pretrained model and real text (experiments/retrofit_lm.py) ------------------

PPL_MARGIN = math.log(1.02)  # "no worse": held-out perplexity within 2% (the one threshold for perplexities)
LM_ARM_NAMES = {
    "plain": "the model continued unlooped",
    "shift": "SHIFT: one loop, then a depth curriculum",
    "loop": "looped from the first step",
    "shift-lora": "SHIFT with per-loop LoRA (and a backward through every loop)",
    "shift-concat": "SHIFT with concat injection",
}
RETROFIT_PAPER = "McLeish et al. (2025): retrofitted recurrence beats the plain model at equal FLOPs (1B models, math)"


def _log_ppl(run: dict, loops: int) -> float:
    return math.log(run["perplexity"][str(loops)])


def lm_tests(cfg, runs: dict[int, dict]) -> list[tuple[str, str, str, dict]]:
    """The study's tests, fixed before any run: (claim, what was compared, the paper column, the outcome of
    :func:`~loopscape.reporting.verdicts.directional` or :func:`~loopscape.reporting.verdicts.non_inferiority`
    on per-seed log-perplexity differences, held out, each arm at the depth it trained)."""
    n, seeds = cfg.n_loops, list(runs.values())
    arms = set(cfg.arms)
    out = []

    def diff(a: str, ka: int, b: str, kb: int) -> list[float]:
        return [_log_ppl(r[a], ka) - _log_ppl(r[b], kb) for r in seeds]

    if "shift" in arms:
        stat = f"ln ppl(plain, 1 loop) - ln ppl(shift, {n} loops)"
        out.append(
            (
                "Looping the middle layers (SHIFT) beats continuing the plain model at equal training FLOPs",
                stat,
                RETROFIT_PAPER,
                directional(diff("plain", 1, "shift", n), name="retrofit gain", statistic=stat),
            )
        )
        stat = f"ln ppl(shift, 1 loop) - ln ppl(shift, {n} loops)"
        out.append(
            (
                f"The retrofitted model uses its loops: {n} loops beat 1 at test time",
                stat,
                "retrofitted recurrence: more test-time recurrence, lower loss",
                directional(diff("shift", 1, "shift", n), name="test-time depth gain", statistic=stat),
            )
        )
    if {"shift", "loop"} <= arms:
        stat = f"ln ppl(loop, {n}) - ln ppl(shift, {n})"
        out.append(
            (
                "SHIFT (one loop first) is no worse than looping from the first step",
                stat,
                "Section 5: SHIFT at no loss",
                non_inferiority(diff("loop", n, "shift", n), PPL_MARGIN, name="SHIFT no loss", statistic=stat),
            )
        )
    for arm in ("shift-lora", "shift-concat"):
        if {"shift", arm} <= arms:
            stat = f"ln ppl(shift, {n}) - ln ppl({arm}, {n})"
            out.append(
                (
                    f"{LM_ARM_NAMES[arm]} beats SHIFT with shared weights and additive injection",
                    stat,
                    "Relaxed Recursive Transformers (LoRA); Huginn, retrofitted recurrence (concat)",
                    directional(diff("shift", n, arm, n), name=arm, statistic=stat),
                )
            )
    return out


def lm_verdicts(cfg, runs: dict[int, dict]) -> tuple[list[dict], list[dict]]:
    """The verdict rows of :func:`lm_tests`, and the tests in full."""
    rows, tests = [], []
    for claim, stat, paper, outcome in lm_tests(cfg, runs):
        if outcome["verdict"] == NOT_TESTED:
            ours = outcome["reason"]
        else:
            t = outcome["test"]
            lo, hi = t["interval"]
            ours = f"{stat}: {t['estimate']:+.4f} (90% interval {lo:+.4f} to {hi:+.4f}; p {t['p_value']:.3g})"
        rows.append(verdict_row(claim, "retrofit on real text", ours, paper, outcome["verdict"], outcome["test"]))
        tests.append({"claim": claim, **outcome})
    return rows, tests


def _interval_text(values: list[float]) -> str:
    s = mean_sd_se(values)
    if len(values) < 2:
        return f"{s['mean']:.2f}"
    half = float(stats.t.ppf(0.95, len(values) - 1)) * s["se"]
    return f"{s['mean']:.2f} ± {half:.2f}"


def lm_figures(cfg, runs: dict[int, dict], untrained: dict, out: Path) -> dict[str, str]:
    """Held-out perplexity against test-time loops (mean over seeds, 90% t-interval), and against training
    FLOPs (the plain loop's readings at each arm's current depth); returns the files' names."""
    import matplotlib.pyplot as plt

    from loopscape.reporting.figures import save_figure

    loops = cfg.test_loops
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    ax.plot(loops, [untrained["perplexity"][str(k)] for k in loops], "k:", label="untrained loops")
    for arm in cfg.arms:
        per_seed = [[r[arm]["perplexity"][str(k)] for k in loops] for r in runs.values()]
        mean = np.mean(per_seed, axis=0)
        if len(per_seed) > 1:
            half = stats.t.ppf(0.95, len(per_seed) - 1) * np.std(per_seed, axis=0, ddof=1) / np.sqrt(len(per_seed))
            ax.errorbar(loops, mean, yerr=half, marker="o", capsize=3, label=arm)
        else:
            ax.plot(loops, mean, marker="o", label=arm)
    ax.set(xlabel="loops at test time", ylabel="held-out perplexity", yscale="log", xticks=loops)
    ax.legend(fontsize=8)
    save_figure(fig, out / "perplexity_loops.png")
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for i, arm in enumerate(cfg.arms):
        for j, r in enumerate(runs.values()):
            readings = r[arm]["readings"]
            if readings:
                ax.plot(
                    [x["flops"] for x in readings],
                    [x["perplexity"] for x in readings],
                    color=f"C{i}",
                    alpha=0.8,
                    marker=".",
                    label=arm if j == 0 else None,
                )
    ax.set(xlabel="training FLOPs", ylabel="held-out perplexity (current depth)", yscale="log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, out / "perplexity_flops.png")
    return {"loops": "perplexity_loops.png", "flops": "perplexity_flops.png"}


def lm_markdown(cfg, runs: dict[int, dict], untrained: dict, rows: list[dict], figures: dict[str, str]) -> str:
    """The study's section: per arm the steps, FLOPs, wall time and held-out perplexity at every test loop
    count (mean over seeds with the 90% t-interval), per seed too, the verdicts with their tests."""
    a, b = cfg.loop_layers
    loops = cfg.test_loops
    head = " | ".join(f"{k} loop{'s' if k > 1 else ''}" for k in loops)
    lines = [
        "# Retrofitted recurrence on a pretrained model and real text",
        "",
        f"Model `{cfg.model_path}`, layers {a}..{b - 1} looped; text `{cfg.data_path}` (the last "
        f"10% by characters held out). Every arm starts from the pretrained weights and spends "
        f"the FLOPs of {cfg.budget_steps} plain steps of {cfg.batch_size} x {cfg.context} tokens (AdamW, lr "
        f"{cfg.lr:g}, trainer `{cfg.trainer}`); looped arms back-propagate through the last "
        f"{cfg.backprop_loops or 'every'} loop(s) (the LoRA arm through every loop), SHIFT switches after "
        f"{cfg.switch_fraction:.0%} of the budget and ramps its depth to {cfg.n_loops}. Arms: "
        + "; ".join(f"**{arm}**: {LM_ARM_NAMES[arm]}" for arm in cfg.arms)
        + f". Seeds {cfg.seeds}. Held-out perplexity on {cfg.eval_windows} windows of {cfg.context} tokens, "
        "mean ± the half-width of the 90% t-interval over seeds.",
        "",
        f"| arm | steps | training FLOPs | wall time | {head} |",
        "|---|---|---|---|" + "---|" * len(loops),
        "| untrained loops | 0 | 0 | 0 | " + " | ".join(f"{untrained['perplexity'][str(k)]:.2f}" for k in loops) + " |",
    ]
    for arm in cfg.arms:
        rs = [r[arm] for r in runs.values()]
        cells = " | ".join(_interval_text([x["perplexity"][str(k)] for x in rs]) for k in loops)
        steps = sorted({x["steps"] for x in rs})
        lines.append(
            f"| {arm} | {'/'.join(map(str, steps))} | {np.mean([x['flops'] for x in rs]):.3g} | "
            f"{np.mean([x['time_s'] for x in rs]):.0f} s | {cells} |"
        )
    lines += ["", f"| seed | arm | {head} |", "|---|---|" + "---|" * len(loops)]
    for seed, run in runs.items():
        for arm in cfg.arms:
            cells = " | ".join(f"{run[arm]['perplexity'][str(k)]:.2f}" for k in loops)
            lines.append(f"| {seed} | {arm} | {cells} |")
    lines += [
        "",
        f"![held-out perplexity against test-time loops]({figures['loops']})",
        "",
        f"![held-out perplexity against training FLOPs]({figures['flops']})",
        "",
        "Tests, stated before the runs (per seed: a difference of held-out log perplexities; a direction by a "
        "one-sided t-test at alpha 0.05 against 0, 'no worse' by non-inferiority with the margin ln 1.02, "
        "perplexity within 2%). Each test is at alpha 0.05 on its own, not corrected for their number; with 3 "
        "seeds a t-test has 2 degrees of freedom; the held-out windows are the same for every seed, so the spread "
        "is that of training on this split:",
        "",
        "| claim | verdict | ours | false-positive rate at the boundary |",
        "|---|---|---|---|",
    ]
    for row in rows:
        rate = row.get("test", {}).get("null_rate")
        lines.append(
            f"| {row['claim']} | **{row['verdict']}** | {row['ours']} | {'-' if rate is None else f'{rate:.3f}'} |"
        )
    return "\n".join(lines)
