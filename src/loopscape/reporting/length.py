"""Figure, table and verdict of length generalisation (Section 4.4, Appendix E.1.3,
Figure 9, Table 1).

Verdict rule, stated once here and printed in the report: **Looped-Attn generalises better** (paper:
Looped-Attn above Single-Attn at every test length, total accuracy): per test length, the per-seed
difference Looped-Attn minus Single-Attn (paired by seed) > 0 by a one-sided t-test (alpha 0.05); the
claim needs every length (intersection-union, :func:`loopscape.reporting.verdicts.all_of`). Table 1's
headline is the table of readings: the same rule under each reading the paper leaves open, and
**reading-dependent** when one reading gives the paper's direction and another contradicts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loopscape.reporting.figures import plt, save_figure
from loopscape.reporting.html import verdict_row as html_verdict_row
from loopscape.reporting.stats import fmt_mean_std, fmt_number
from loopscape.reporting.verdicts import NOT_TESTED, all_of, describe, directional, not_tested, over_readings

PAPER_TABLE1 = {  # length: (# simple sequences share, Single-Attn, Looped-Attn) on simple sequences, %
    4: (1.0, 69.25, 72.29),
    8: (0.995, 52.83, 62.78),
    11: (0.645, 55.57, 70.28),
    14: (0.0, None, None),
    17: (0.0, None, None),  # printed as L = 18 in Table 1; the text says 17
}
NAMES = {"single_attn": "Single-Attn", "looped_attn": "Looped-Attn", "shift": "SHIFT (SCP)"}


def length_verdict(length: dict, train_length: int) -> dict:
    """The rule above; ``not tested`` without a test length past the training length."""
    name = "length generalisation"
    tests = {L: row for L, row in length.items() if int(L) != train_length}
    if not tests:
        return not_tested(name, "Looped-Attn minus Single-Attn", "no test length past the training length") | {
            "per_length": {}
        }
    parts, per_length = {}, {}
    for L, row in tests.items():
        diffs = np.subtract(row["looped_attn"]["all_per_seed"], row["single_attn"]["all_per_seed"])
        parts[f"L = {L}"] = directional(diffs, name=name, statistic=f"Looped-Attn minus Single-Attn at L = {L} (pts)")
        per_length[L] = {
            "diff_pts": float(diffs.mean()),
            "per_seed": diffs.tolist(),
            "verdict": parts[f"L = {L}"]["verdict"],
        }
    out = all_of(parts, name=name, statistic="every test length (intersection-union)")
    return out | {"per_length": per_length}


def plot_length(length: dict, path: Path) -> None:
    """Figure 9: total accuracy and accuracy on simple sequences against sequence length, each beside the
    Bayes-optimal predictor on the same sequences."""
    Ls = sorted(int(L) for L in length)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # distinct markers, dashes and offsets: curves that coincide (SHIFT that never shifted is Single-Attn) stay visible
    styles = (
        ("single_attn", "tab:blue", "o", "-", -0.12),
        ("looped_attn", "tab:red", "s", "-", 0.0),
        ("shift", "tab:orange", "^", "--", 0.12),
    )
    for ax, subset in zip(axes, ("all", "simple")):
        have = [L for L in Ls if length[str(L)][f"bayes_{subset}"] is not None]
        for name, color, marker, ls, dx in styles:
            if name not in length[str(Ls[0])]:
                continue
            m = np.array([length[str(L)][name][subset]["mean"] for L in have])
            sd = np.array([length[str(L)][name][subset]["std"] for L in have])
            x = np.array(have) + dx
            ax.errorbar(x, m, yerr=sd, marker=marker, ls=ls, mfc="none", capsize=3, color=color, label=NAMES[name])
        ax.plot(have, [100 * length[str(L)][f"bayes_{subset}"] for L in have], "k:", label="Bayes-optimal")
        title = "total accuracy" if subset == "all" else "accuracy on simple sequences (Table 1)"
        ax.set(xlabel="sequence length L (4 = training)", ylabel=f"{title} (%)", title=title, xticks=Ls, ylim=(0, 102))
        ax.legend(fontsize=8)
    save_figure(fig, path)


def selection_effects(length: dict, train_length: int) -> list[str]:
    """Lines saying where the simple-subset accuracy rises from one test length to the next for the
    Bayes-optimal predictor too: a change of the subset, not of the models."""
    Ls = [L for L in sorted(length, key=int) if int(L) != train_length and length[L]["bayes_simple"] is not None]
    lines = []
    for a, b in zip(Ls, Ls[1:]):
        ra, rb = length[a], length[b]
        bayes = 100 * (rb["bayes_simple"] - ra["bayes_simple"])
        models = {n: rb[n]["simple"]["mean"] - ra[n]["simple"]["mean"] for n in NAMES if n in ra and ra[n]["simple"]}
        if bayes > 1 and any(d > 0 for d in models.values()):
            rises = ", ".join(f"{NAMES[n]} {d:+.1f}" for n, d in models.items())
            na, nb = (round(r["n"] * r["simple_share"]) for r in (ra, rb))
            lines.append(
                f"- From L = {a} to {b} the accuracy on simple sequences rises for the Bayes-optimal predictor too "
                f"({bayes:+.1f} pts; {rises} pts; {na} then {nb} simple sequences): the subset changes (fewer, more "
                "predictable sequences), so this rise is a selection effect, not better generalisation."
            )
    return lines


def length_markdown(
    length: dict,
    train_length: int,
    verdict: dict,
    alpha: float,
    positions: str,
    slots: int,
    test_targets: str = "aligned",
) -> str:
    """The section: Table 1 beside the paper's and the Bayes-optimal predictor, and the verdict. ``alpha``
    is the test sets' tilt; ``positions`` and ``slots`` the models' position codes (``LinearAttnConfig``);
    ``test_targets`` the test sets' law (``MarkovLanguage.test_law``)."""
    codes = {
        "cyclic_end": f"count the {slots} position codes cyclically from the end, so the query keeps its training code",
        "cyclic": f"reuse the {slots} position codes cyclically from the start",
    }.get(positions, f"have their own position codes ({slots} slots)")
    law = (
        f"the transitions applied cyclically with the cycle aligned so that T_{train_length - 1}, the training "
        "targets' transition, makes every target (the phase-consistent reading of E.1.3's 'same transition dynamics')"
        if test_targets == "aligned"
        else "the transitions applied cyclically from the start (every target at L = 8-17 made by T_1)"
    )
    n_test = next((row["n"] for L, row in length.items() if int(L) != train_length), 0)
    lines = [
        "# Length generalisation (Section 4.4, Appendix E.1.3, Figure 9, Table 1)",
        "",
        f"Test sets: {n_test} tilted draws (alpha = {alpha:g}) per length, {law}; "
        "'simple' = IC at most the largest training IC. "
        f"Position codes past the training input length: the models {codes}. "
        "Bayes = the Bayes-optimal predictor (the bigram rule of the transition that makes the target) on the same "
        "sequences; 'exact' is its accuracy under the chain itself, computed from the transitions. "
        "The paper's Table 1 prints L = 18 where its text says 17; we follow the text.",
        "",
        "| L | simple share (ours / paper) | Bayes simple | Single-Attn simple (ours / paper) "
        "| Looped-Attn simple (ours / paper) | SHIFT simple | Bayes all (sample / exact) | Single-Attn all "
        "| Looped-Attn all | SHIFT all |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for L in sorted(length, key=int):
        row = length[L]
        share_p, s_p, l_p = PAPER_TABLE1.get(int(L), (None, None, None))
        cells = [f"{100 * row['simple_share']:.1f}% / {'' if share_p is None else f'{100 * share_p:.1f}%'}"]
        cells.append("" if row["bayes_simple"] is None else f"{100 * row['bayes_simple']:.2f}")
        for name, paper in (("single_attn", s_p), ("looped_attn", l_p)):
            cells.append(f"{fmt_mean_std(row[name]['simple'])} / {fmt_number(paper)}")
        cells.append(fmt_mean_std(row["shift"]["simple"]) if "shift" in row else "")
        cells.append(f"{100 * row['bayes_all']:.2f} / {100 * row['bayes_exact']:.2f}")
        cells += [fmt_mean_std(row[n]["all"]) if n in row else "" for n in ("single_attn", "looped_attn", "shift")]
        lines.append(f"| {L}{' (training)' if int(L) == train_length else ''} | " + " | ".join(cells) + " |")
    lines += [""] + selection_effects(length, train_length)
    lines += [
        "",
        "## Verdict on length generalisation (Looped-Attn above Single-Attn, total accuracy): "
        f"**{verdict['verdict']}**",
        "",
    ]
    if verdict["verdict"] == NOT_TESTED:
        lines.append(f"Not tested: {verdict['reason']}.")
    for L, w in verdict["per_length"].items():
        per_seed = ", ".join(f"{d:+.1f}" for d in w["per_seed"])
        lines.append(
            f"- L = {L}: Looped-Attn minus Single-Attn {w['diff_pts']:+.2f} pts (per seed {per_seed}): "
            f"{describe(verdict['test']['parts'][f'L = {L}'])} ({w['verdict']})"
        )
    lines += ["", "Rule: a one-sided t-test over seeds at every test length; every length must hold.", ""]
    lines += loop_lines(length, train_length)
    return "\n".join(lines)


def loop_lines(length: dict, train_length: int) -> list[str]:
    """Looped-Attn read after each loop, and the largest |logit| of each model, per length: the literal
    equations sum over the n tokens, so over the loops the logits grow with n."""
    name = "looped_attn"
    T = len(length[str(train_length)][name]["per_loop_all"])
    lines = [
        "### Looped-Attn read after each loop; the largest |logit|",
        "",
        "The same trained weights read through W_h after loop t (loop T is the model's own output), total "
        "accuracy, mean over seeds; and the largest |logit| on the test set (mean over seeds). Where a loop "
        "before the last scores higher, the later loops cause the fall.",
        "",
        "| L | " + " | ".join(f"after loop {t + 1}" for t in range(T)) + " | Single-Attn | largest |logit|, "
        "Single-Attn | largest |logit|, Looped-Attn |",
        "|---" * (T + 4) + "|",
    ]
    for L in sorted(length, key=int):
        row = length[L]
        loops = " | ".join(f"{s['mean']:.1f}" for s in row[name]["per_loop_all"])
        lines.append(
            f"| {L} | {loops} | {row['single_attn']['all']['mean']:.1f} | "
            f"{np.mean(row['single_attn']['max_abs_logit']):.3g} | {np.mean(row[name]['max_abs_logit']):.3g} |"
        )
    return lines + [""]


def verdict_row(verdict: dict) -> dict:
    """Length generalisation's row of a report's verdict table (the headline reading)."""
    if verdict["verdict"] == NOT_TESTED:
        ours = verdict["reason"]
    else:
        ours = ", ".join(f"L={L}: {w['diff_pts']:+.1f} pts" for L, w in verdict["per_length"].items())
    claim = "Looped-Attn generalises to longer sequences better than Single-Attn (headline reading)"
    return html_verdict_row(
        claim,
        "Section 4.4, Figure 9, Table 1",
        ours,
        "Looped-Attn above at every length",
        verdict["verdict"],
        verdict["test"],
    )


def reading_label(row: dict) -> str:
    return f"{READING_NAMES[row['attention']]}, {READING_NAMES[row['positions']]}, {row['test_targets']} targets"


def readings_verdict(rows: list[dict]) -> dict:
    """Table 1 over the readings (:func:`loopscape.reporting.verdicts.over_readings`), the headline reading
    being the default row."""
    readings = {reading_label(r): r["verdict"] for r in rows}
    headline = next(reading_label(r) for r in rows if r["default"])
    return over_readings(
        readings, headline, name="Table 1 over readings", statistic="Looped-Attn minus Single-Attn at every length"
    )


def readings_row(verdict: dict, rows: list[dict]) -> dict:
    """Table 1's row over the open readings: which readings give which word."""
    by_word: dict[str, list[str]] = {}
    for label, word in verdict["readings"].items():
        by_word.setdefault(word, []).append(label)
    ours = "; ".join(f"{word}: {len(labels)} reading(s) ({' | '.join(labels)})" for word, labels in by_word.items())
    claim = (
        "Table 1 over the readings the paper leaves open: the headline reading's word, reading-dependent if the "
        "sign flips"
    )
    return html_verdict_row(
        claim, "Table 1, Appendix E.1.3", ours, "Looped-Attn above", verdict["verdict"], verdict["test"]
    )


READING_NAMES = {
    "sum": "sum (paper)",
    "mean": "1/n",
    "cyclic_end": "cyclic codes from the end",
    "cyclic": "cyclic codes from the start",
    "absolute": "absolute, enough slots",
    "none": "none",
}
# why a reading is not Table 1's headline (the headline: the paper's sum, codes from the end, aligned targets)
NOT_HEADLINE = {
    ("attention", "mean"): "f divided by n, which the paper's equations do not do",
    ("positions", "cyclic"): "the query gets a position code it never had as a query in training",
    ("positions", "absolute"): "codes no training input reached: untrained directions, new to the model",
    ("positions", "none"): "no position code: not the paper's embedding",
    ("test_targets", "cyclic"): "every test target made by T_1, which made no training target: new dynamics, which "
    "E.1.3 sets out to avoid",
}


def why_not_headline(row: dict) -> str:
    reasons = [
        NOT_HEADLINE[(k, row[k])] for k in ("attention", "positions", "test_targets") if (k, row[k]) in NOT_HEADLINE
    ]
    return "; ".join(reasons) if reasons else "headline"


def readings_markdown(rows: list[dict], train_length: int, seeds: list[int], verdict: dict | None = None) -> str:
    """Table 1 under open readings: one row per (attention, positions, test targets), total
    accuracy per test length beside the Bayes-optimal predictor's, Looped-Attn minus Single-Attn,
    the verdict by the rule above, and why each reading is not the headline."""
    lengths = [L for L in rows[0]["length"] if int(L) != train_length]
    per = " / ".join(lengths)
    lines = [
        "# Table 1 under the readings the paper leaves open",
        "",
        f"Single-Attn and Looped-Attn trained for each reading of the model (seeds {seeds}), each scored on "
        "two readings of the test targets. Attention: the paper's sum over tokens, or divided by the input "
        "length n. Positions past the training input: codes counted cyclically from the end (the query keeps its "
        "training code), from the start, absolute codes with a slot for every test position, or no position code "
        "(codes from the end and from the start are the same model at the training length: trained once). Test "
        "targets: aligned, the cycle of transitions rotated so that the training targets' transition "
        f"(T_{train_length - 1}) makes every target, or cyclic from the start (every target at L = 8-17 made by "
        f"T_1). Total accuracy, %, mean over seeds at L = {per}, beside the Bayes-optimal predictor's on the same "
        "sequences; the row in bold is Table 1's headline (the phase-consistent reading: E.1.3 keeps the test "
        "dynamics those of training), and the last column says why each other reading is not.",
        "",
        f"| attention | positions | test targets | Single-Attn ({per}) | Looped-Attn ({per}) "
        f"| Looped - Single, pts ({per}) | verdict | Bayes-optimal ({per}) | not the headline because |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:

        def means(name, res=row["length"]):
            return " / ".join(f"{res[L][name]['all']['mean']:.1f}" for L in lengths)

        diffs = row["verdict"]["per_length"]
        diff = " / ".join(f"{diffs[L]['diff_pts']:+.1f}" for L in lengths) if diffs else "-"
        cells = [
            READING_NAMES[row["attention"]],
            READING_NAMES[row["positions"]],
            row["test_targets"],
            means("single_attn"),
            means("looped_attn"),
            diff,
            row["verdict"]["verdict"],
            " / ".join(f"{100 * row['length'][L]['bayes_all']:.1f}" for L in lengths),
            "-" if row["default"] else why_not_headline(row),
        ]
        if row["default"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {}
    for row in rows:
        counts[row["verdict"]["verdict"]] = counts.get(row["verdict"]["verdict"], 0) + 1
    lines += [
        "",
        "Verdicts over the readings: " + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) + ". Rule as "
        "above, per reading: a one-sided t-test over seeds of Looped-Attn minus Single-Attn at every test length. "
        "Over the readings: reading-dependent if one reading gives the paper's direction (reproduced or direction "
        "only) and another contradicts it.",
        "",
    ]
    if verdict is not None:
        lines += [f"**Table 1 over the readings: {verdict['verdict']}.**", ""]
    return "\n".join(lines)
