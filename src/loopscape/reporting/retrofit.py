"""The retrofit study's verdicts and section (Appendix B: recursion introduced into a trained decoder)."""

from __future__ import annotations

from loopscape.reporting.html import NOT_TESTED, verdict_row
from loopscape.reporting.stats import mean_sd_se

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
