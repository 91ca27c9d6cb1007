"""Hessian study of the Markov runs: Figures 3c, 3d, 9b, 9c, the landscape tables, and the verdicts on
Observation 2, the Mutual Information statements, Assumption 1, Corollary 1 and Conjectures 1-2, each a
test over the tracked seeds (:mod:`loopscape.reporting.verdicts`).

**Observation 2 (Matrix Entropy).** Per seed, ``c`` is a tenth of the largest entropy either model reaches
on that seed (not of ``log(n_bins)``: on one binning for the whole run the early, largest ``|lambda|`` set
the bin width, so curves stay far below ``log(n_bins)``). A curve's three-phase margins, in units of ``c``:

* collapse: ``(E(1) - min E over epochs 1..150) / c - 1``;
* diversification: ``(max E after that minimum - the minimum) / c - 1``;
* stabilisation: ``1 - (range of E over the last 100 epochs) / c``;

its **phase score** is the smallest of the three (positive iff it shows all three phases), and its
**static score** is ``1 - (range of E over epochs >= 10) / c`` (positive iff static). The claim is judged
comparatively, each model fed to both tests: (i) Looped-Attn's phase score > 0, (ii) Looped-Attn's phase
score minus Single-Attn's > 0, (iii) Single-Attn's static score minus Looped-Attn's > 0; each a one-sided
t-test over seeds, and the claim is reproduced only if all three are (intersection-union).

**Mutual Information** (Phase I decrease, Phase II rise, Phase III high plateau; Single-Attn static): the
same margins on the MI curve with ``c`` from the MI curves, plus a plateau margin
``(mean MI over the last 100 epochs - the Phase I minimum) / c - 1`` in the phase score; the same three
comparative parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loopscape.landscape.river_valley import (
    EPS_GRID,
    assumption1,
    cap_free,
    common_eps,
    kappa_curve,
    valley_diagnostics,
)
from loopscape.landscape.spectrum import trajectory_metrics
from loopscape.reporting.figures import LABELS, PHASE_EPOCH, plt, save_figure
from loopscape.reporting.html import verdict_row
from loopscape.reporting.verdicts import NOT_TESTED, all_of, describe, directional, evidence, not_tested

STABLE_EPOCHS = 100  # Looped-Attn's stabilisation: its curve's range over the last 100 epochs
SNAPSHOTS = {"single_attn": [10, 50, 100, 150], "looped_attn": [1, 50, 60, 150, 170, 400]}
OBS2_RULE = (
    "per seed, c = a tenth of the largest Matrix Entropy either model reaches; phase score = the smallest of the "
    f"margins collapse (E(1) - min E over epochs 1..{PHASE_EPOCH}) / c - 1, diversification (rise after that "
    f"minimum) / c - 1, stabilisation 1 - range over the last {STABLE_EPOCHS} epochs / c; static score = 1 - range "
    "over epochs >= 10 / c. Reproduced if, by one-sided t-tests over seeds at alpha 0.05, Looped-Attn's phase score "
    "> 0, Looped-Attn's phase score > Single-Attn's and Single-Attn's static score > Looped-Attn's (all three)"
)
MI_RULE = (
    "the Observation 2 rule on the Mutual Information curves (c from the MI curves), with a fourth margin in the "
    f"phase score, a high plateau: (mean MI over the last {STABLE_EPOCHS} epochs - the Phase I minimum) / c - 1"
)
A1_RULE = (
    "at epoch 150 and at the end, both models cut at one eps (1e-3 x the larger of the two largest |lambda|) and "
    "tau = 0.5 absolute: (a) m_looped - m_single > 0 and (b) the dominance margin min_j log10(lambda~_j(1) / "
    "lambda~_j(2)) > 0, each by a one-sided t-test over seeds; reproduced if all four are"
)
COROLLARY1_RULE = (
    "per seed, C of each model with the river/valley basis fixed at epoch 150 and one eps for both models; "
    "log10(C_looped / C_single) > 0 by a one-sided t-test over seeds, bar 1 (a 10x ratio, the paper's '>>')"
)
CONJECTURES_RULE = (
    "per seed at the last epoch, both models cut at one eps = r x the larger of the two largest |lambda| for each "
    f"r in {list(EPS_GRID)}; statistic: the smallest over r of log10(kappa_looped / kappa_single); one-sided t-test "
    "over seeds, bar log10(2) (Looped-Attn's valley at least twice as ill-conditioned at every threshold)"
)


def trajectories(
    spectra: dict[str, list[tuple[np.ndarray, np.ndarray]]], n_bins: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per model: epochs and ME / MI curves averaged over tracked seeds (the figures)."""
    out = {}
    for model, runs in spectra.items():
        mets = per_seed_trajectories(runs, n_bins)
        out[model] = {"epochs": runs[0][0], **{k: np.mean([m[k] for m in mets], axis=0) for k in mets[0]}}
    return out


def per_seed_trajectories(runs: list[tuple[np.ndarray, np.ndarray]], n_bins: int) -> list[dict[str, np.ndarray]]:
    """Each tracked seed's Matrix Entropy and Mutual Information curves (one binning per run)."""
    return [trajectory_metrics(list(eigs), n_bins) for _, eigs in runs]


def phase_margins(curve: np.ndarray, epochs: np.ndarray, c: float, plateau: bool = False) -> dict:
    """The three-phase margins of one curve in units of ``c`` (module docstring), their minimum ``score``,
    and its ``static`` score."""
    early = (epochs >= 1) & (epochs <= PHASE_EPOCH)
    e1 = curve[epochs >= 1][0]
    i_min = int(np.flatnonzero(early)[np.argmin(curve[early])])
    after = curve[i_min + 1 :]
    last = epochs > epochs[-1] - STABLE_EPOCHS
    m = {
        "collapse": float((e1 - curve[i_min]) / c - 1),
        "diversification": float((after.max() - curve[i_min]) / c - 1) if after.size else -1.0,
        "stabilisation": float(1 - np.ptp(curve[last]) / c),
    }
    if plateau:
        m["plateau"] = float((curve[last].mean() - curve[i_min]) / c - 1)
    m["score"] = min(m.values())
    m["min_epoch"] = int(epochs[i_min])
    m["static"] = float(1 - np.ptp(curve[epochs >= 10]) / c)
    return m


def _curves_judged(
    per_seed: dict[str, list[dict]],
    epochs: dict[str, np.ndarray],
    key: str,
    name: str,
    plateau: bool,
    seeds: list[int],
) -> dict:
    """The comparative three-phase rule on curve ``key`` (``entropy`` or ``mutual_information``) over seeds."""
    rows = []
    for seed, s_curves, l_curves in zip(seeds, per_seed["single_attn"], per_seed["looped_attn"]):
        cs, cl = s_curves[key], l_curves[key]
        es, el = epochs["single_attn"][: cs.size], epochs["looped_attn"][: cl.size]
        c = 0.1 * float(max(cs.max(), cl.max()))
        if c <= 0:  # the whole spectrum in one bin: no shape to judge on this seed
            continue
        margins = {"looped": phase_margins(cl, el, c, plateau), "single": phase_margins(cs, es, c, plateau)}
        rows.append({"seed": seed, "c": c, **margins})
    if not rows:
        return not_tested(name, "phase and static scores", f"every {key.replace('_', ' ')} curve is 0")
    looped = [r["looped"]["score"] for r in rows]
    parts = {
        "Looped-Attn shows the phases": directional(looped, name=name, statistic="Looped-Attn's phase score"),
        "more than Single-Attn does": directional(
            [r["looped"]["score"] - r["single"]["score"] for r in rows],
            name=name,
            statistic="phase score, Looped-Attn minus Single-Attn",
        ),
        "Single-Attn static, Looped-Attn not": directional(
            [r["single"]["static"] - r["looped"]["static"] for r in rows],
            name=name,
            statistic="static score, Single-Attn minus Looped-Attn",
        ),
    }
    out = all_of(parts, name=name, statistic="three comparative parts (intersection-union)")
    return out | {"seeds": rows}


def _long_enough(epochs: dict[str, np.ndarray]) -> str | None:
    needed = PHASE_EPOCH + STABLE_EPOCHS
    last = int(min(e[-1] for e in epochs.values()))
    if last < needed:
        return (
            f"spectra tracked to epoch {last}; the three phases need {needed} (collapse by {PHASE_EPOCH}, then "
            f"{STABLE_EPOCHS} epochs to stabilise)"
        )
    return None


def _judge(spectra: dict, n_bins: int, seeds: list[int] | None, key: str, name: str, rule: str) -> dict:
    """The comparative three-phase rule on each tracked seed's ``key`` curve (``entropy`` or
    ``mutual_information``, whose ``I(H_s; H_s+1)`` is indexed by ``s``: one epoch fewer)."""
    mi = key == "mutual_information"
    epochs = {m: runs[0][0][:-1] if mi else runs[0][0] for m, runs in spectra.items()}
    why = _long_enough(epochs)
    if why:
        return not_tested(name, "phase and static scores", why) | {"rule": rule}
    per_seed = {m: per_seed_trajectories(runs, n_bins) for m, runs in spectra.items()}
    seeds = list(range(len(spectra["looped_attn"]))) if seeds is None else seeds
    return _curves_judged(per_seed, epochs, key, name, mi, seeds) | {"rule": rule}


def observation2_verdict(spectra: dict, n_bins: int, seeds: list[int] | None = None) -> dict:
    """Observation 2 by :data:`OBS2_RULE` on each tracked seed's Matrix Entropy curves."""
    return _judge(spectra, n_bins, seeds, "entropy", "Observation 2", OBS2_RULE)


def mutual_information_verdict(spectra: dict, n_bins: int, seeds: list[int] | None = None) -> dict:
    """The Mutual Information statements of Observation 2 by :data:`MI_RULE` (with the plateau margin)."""
    return _judge(spectra, n_bins, seeds, "mutual_information", "Mutual Information", MI_RULE)


def _phase_text(v: dict) -> str:
    if v["verdict"] == NOT_TESTED:
        return v["reason"]
    looped = [r["looped"]["score"] for r in v["seeds"]]
    single = [r["single"]["score"] for r in v["seeds"]]
    static = [(r["single"]["static"], r["looped"]["static"]) for r in v["seeds"]]
    n = len(v["seeds"])
    return (
        f"phase score Looped-Attn {np.mean(looped):+.2f} (all three phases on {sum(x > 0 for x in looped)}/{n} "
        f"seeds), Single-Attn {np.mean(single):+.2f} ({sum(x > 0 for x in single)}/{n}); static on "
        f"{sum(a > 0 for a, _ in static)}/{n} seeds for Single-Attn, {sum(b > 0 for _, b in static)}/{n} for "
        f"Looped-Attn; parts: " + ", ".join(f"{k} {w}" for k, w in v["parts"].items())
    )


def observation2_rows(o2: dict, mi: dict) -> list[dict]:
    claim = "Observation 2: Single-Attn's Hessian static; Looped-Attn's collapses, diversifies, stabilises"
    rows = [verdict_row(claim, "Section 4.1", _phase_text(o2), "Figure 3c", o2["verdict"], o2["test"])]
    claim = "Observation 2, Mutual Information: falls (Phase I), rises (II), high plateau (III); Single-Attn static"
    rows.append(verdict_row(claim, "Section 4.1", _phase_text(mi), "Figure 3d", mi["verdict"], mi["test"]))
    return rows


# -- the valley: one threshold, over seeds --------------------------------------------------------------------


def _at(runs: list[tuple[np.ndarray, np.ndarray]], seed_index: int, epoch: int) -> np.ndarray | None:
    ep, eigs = runs[seed_index]
    return eigs[list(ep).index(epoch)] if epoch in ep else None


def landscape_table(spectra: dict, epochs: list[int]) -> dict:
    """Per tracked seed and epoch: each model's valley diagnostics at the pair's common eps, kappa over
    ``EPS_GRID``, the cap-free statistics, and Assumption 1."""
    n_seeds = min(len(runs) for runs in spectra.values())
    table = []
    for i in range(n_seeds):
        for e in epochs:
            eig = {m: _at(runs, i, e) for m, runs in spectra.items()}
            if any(v is None for v in eig.values()):
                continue
            ref = common_eps(*eig.values(), rel=1.0)
            eps = common_eps(*eig.values())
            table.append(
                {
                    "seed_index": i,
                    "epoch": e,
                    "eps": eps,
                    "models": {
                        m: {
                            **valley_diagnostics(v, eps).as_dict(),
                            "kappa_curve": kappa_curve(v, ref),
                            **cap_free(v),
                        }
                        for m, v in eig.items()
                    },
                    "assumption1": assumption1(eig["single_attn"], eig["looped_attn"], eps),
                }
            )
    return {"rows": table, "eps_grid": list(EPS_GRID)}


def assumption1_verdict(land: dict, epochs: list[int]) -> dict:
    """Assumption 1 by :data:`A1_RULE`."""
    name = "Assumption 1"
    rows = land["rows"]
    if PHASE_EPOCH not in epochs or not rows:
        why = f"judged at epoch {PHASE_EPOCH} and at the end; tracked: {', '.join(map(str, epochs)) or 'none'}"
        return not_tested(name, "m_looped - m_single; dominance margin", why) | {"rule": A1_RULE}
    parts = {}
    for e in epochs:
        at = [r["assumption1"] for r in rows if r["epoch"] == e]
        parts[f"(a) dimension, epoch {e}"] = directional(
            [a["m_looped"] - a["m_single"] for a in at], name=name, statistic=f"m_looped - m_single at epoch {e}"
        )
        parts[f"(b) dominance, epoch {e}"] = directional(
            [a["dominance_margin"] for a in at], name=name, statistic=f"dominance margin (log10) at epoch {e}"
        )
    return all_of(parts, name=name, statistic="dimension and dominance at both epochs") | {"rule": A1_RULE}


def conjectures_verdict(land: dict, final_epoch: int) -> dict:
    """Conjectures 1-2 by :data:`CONJECTURES_RULE`."""
    name = "Conjectures 1-2"
    stat = "min over eps of log10(kappa_looped / kappa_single)"
    if final_epoch < PHASE_EPOCH:
        reason = f"the runs end at epoch {final_epoch}; judged on trained models, past epoch {PHASE_EPOCH}"
        return not_tested(name, stat, reason) | {"rule": CONJECTURES_RULE}
    values = []
    for r in land["rows"]:
        if r["epoch"] != final_epoch:
            continue
        ks, kl = r["models"]["single_attn"]["kappa_curve"], r["models"]["looped_attn"]["kappa_curve"]
        ratios = [np.log10(b / a) for a, b in zip(ks, kl) if a is not None and b is not None]
        values.append(min(ratios) if ratios else None)
    if not values:
        return not_tested(name, stat, "no tracked epoch at the end of training") | {"rule": CONJECTURES_RULE}
    return directional(values, name=name, statistic=stat, bar=float(np.log10(2))) | {"rule": CONJECTURES_RULE}


def corollary1_verdict(force: dict) -> dict:
    """Corollary 1 by :data:`COROLLARY1_RULE` (``force``: :func:`measured_force`-style, ``per_seed`` list)."""
    name = "Corollary 1"
    stat = "log10(C_looped / C_single)"
    if force.get("reference_epoch") != PHASE_EPOCH:
        reason = f"C needs the river/valley basis at epoch {PHASE_EPOCH} and training after it"
        return not_tested(name, stat, reason) | {"rule": COROLLARY1_RULE}
    values = [  # a seed whose C could not be formed (an empty valley) is missing, and counted so
        np.log10(f["looped_attn"]["C"] / f["single_attn"]["C"])
        if all(f.get(m) and f[m]["C"] for m in ("single_attn", "looped_attn"))
        else None
        for f in force.get("per_seed", [])
    ]
    if not values:
        return not_tested(name, stat, "no seed tracked both models at the reference epoch") | {"rule": COROLLARY1_RULE}
    return directional(values, name=name, statistic=stat, bar=1.0) | {"rule": COROLLARY1_RULE}


def landscape_rows(a1: dict, cor1: dict, conj: dict) -> list[dict]:
    """Assumption 1's, Corollary 1's and Conjectures 1-2's rows of a report's verdict table."""

    rows = []
    claim = "Assumption 1: Looped-Attn has more, and smaller, low-curvature valley eigenvalues (one eps, tau 0.5)"
    if a1["verdict"] == NOT_TESTED:
        ours = a1["reason"]
    else:
        ours = "parts: " + ", ".join(f"{k} {w}" for k, w in a1["parts"].items())
    rows.append(verdict_row(claim, "Section 4.2", ours, "assumed", a1["verdict"], a1["test"]))
    claim = "Corollary 1: Looped-Attn's cumulative force C >> Single-Attn's (measured, one eps)"
    rows.append(
        verdict_row(
            claim, "Section 4.3", evidence(cor1, "log10 ratio per seed"), "C(2) >> C(1)", cor1["verdict"], cor1["test"]
        )
    )
    claim = "Conjectures 1-2: Single-Attn's valley U-shaped, Looped-Attn's V-shaped (judged comparatively over eps)"
    rows.append(
        verdict_row(
            claim,
            "Section 4.2",
            evidence(conj, "min log10 kappa ratio per seed"),
            "conjectured",
            conj["verdict"],
            conj["test"],
        )
    )
    return rows


def plot_metrics(traj: dict, path: Path) -> None:
    """Figures 3c and 3d side by side: Matrix Entropy and Mutual Information per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for model, t in traj.items():
        axes[0].plot(t["epochs"], t["entropy"], label=LABELS[model], lw=1.2)
        axes[1].plot(t["epochs"][:-1], t["mutual_information"], label=LABELS[model], lw=1.2)
    axes[0].set_title("(c) Matrix Entropy E(H_s)")
    axes[1].set_title("(d) Mutual Information I(H_s; H_s+1)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_snapshots(spectra: dict, path: Path) -> None:
    """Figures 9b, 9c: eigenvalue histograms at the paper's epochs (first tracked seed)."""
    rows = [(m, [e for e in SNAPSHOTS[m] if e in spectra[m][0][0]]) for m in spectra]
    ncol = max(len(es) for _, es in rows) or 1
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.4 * len(rows)), squeeze=False)
    for r, (model, es) in enumerate(rows):
        ep, eigs = spectra[model][0]
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(es):
                ax.axis("off")
                continue
            ev = eigs[list(ep).index(es[c])]
            ax.hist(ev, bins=40, color="tab:blue" if model == "single_attn" else "tab:orange")
            ax.set_yscale("log")
            ax.set_title(f"{LABELS[model]}, epoch {es[c]}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel("Hessian eigenvalue")
    fig.tight_layout()
    save_figure(fig, path)


def _seed_table(v: dict) -> list[str]:
    if v["verdict"] == NOT_TESTED:
        return [f"Not tested: {v['reason']}."]
    lines = [
        "| seed | c | Looped-Attn margins (collapse / diversification / stabilisation) | Looped phase score "
        "| Single phase score | Single static | Looped static |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in v["seeds"]:
        lm = r["looped"]
        margins = " / ".join(
            f"{lm[k]:+.2f}" for k in ("collapse", "diversification", "stabilisation", "plateau") if k in lm
        )
        lines.append(
            f"| {r['seed']} | {r['c']:.3g} | {margins} | {lm['score']:+.2f} | {r['single']['score']:+.2f} | "
            f"{r['single']['static']:+.2f} | {lm['static']:+.2f} |"
        )
    return lines + [
        "",
        "Tests: " + "; ".join(f"{k}: {describe(p)} ({p['verdict']})" for k, p in v["test"]["parts"].items()) + ".",
    ]


def hessian_markdown(
    o2: dict, mi: dict, land: dict, a1: dict, cor1: dict, conj: dict, seeds: list[int], n_bins: int
) -> str:
    lines = [
        "## Hessian-level dynamics (Observation 2, Assumption 1, Corollary 1, Conjectures 1-2)",
        "",
        "Exact spectra of the training-loss Hessian (float64) every tracked epoch on the tracked seeds "
        f"{seeds}; Matrix Entropy and Mutual Information on {n_bins} equal |lambda| bins, one binning per run "
        "(histogram variant; docs/markov.md). Every verdict below is a test over these seeds "
        "(reporting/verdicts.py); the figures show the mean curves.",
        "",
        f"### Verdict on Observation 2 (Matrix Entropy): **{o2['verdict']}**",
        "",
        f"Rule: {o2['rule']}.",
        "",
        *_seed_table(o2),
        "",
        f"### Verdict on the Mutual Information statements: **{mi['verdict']}**",
        "",
        f"Rule: {mi['rule']}.",
        "",
        *_seed_table(mi),
        "",
        "### The valley at one threshold",
        "",
        "Definition 1's eps is one value for the pair compared: 1e-3 x the larger of the two models' largest "
        "|lambda| at that seed and epoch (a threshold per model would decide the comparison by itself: each "
        "model's kappa would be capped at 1000). tau = 0.5 is absolute (Remark 5). Beside kappa at that eps: "
        f"kappa over eps = r x the same reference for r in {land['eps_grid']} (the figure), and statistics "
        "free of any threshold: positive eigenvalues in each decade below the largest, lambda_1 / lambda_10, "
        "the participation ratio (sum |lambda|)^2 / sum lambda^2, and the count in (0, 0.5].",
        "",
        "| model | seed | epoch | eps | valley dim | kappa | m_tau | per decade (top 6) | lambda_1/lambda_10 "
        "| participation ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in land["rows"]:
        for m, d in r["models"].items():
            ratio = "-" if d["top_ratio"] is None else f"{d['top_ratio']:.3g}"
            lines.append(
                f"| {LABELS[m]} | {seeds[r['seed_index']]} | {r['epoch']} | {r['eps']:.3g} | {d['d_valley']} | "
                f"{d['kappa']:.3g} | {d['m_tau']} | {' '.join(map(str, d['per_decade']))} | {ratio} | "
                f"{d['participation_ratio']:.3g} |"
            )
    lines += [
        "",
        f"### Verdict on Assumption 1: **{a1['verdict']}**",
        "",
        f"Rule: {a1['rule']}.",
        "",
        "| seed | epoch | m_single | m_looped | dominance margin (log10) |",
        "|---|---|---|---|---|",
    ]
    for r in land["rows"]:
        a = r["assumption1"]
        margin = "-" if a["dominance_margin"] is None else f"{a['dominance_margin']:+.3f}"
        lines.append(f"| {seeds[r['seed_index']]} | {r['epoch']} | {a['m_single']} | {a['m_looped']} | {margin} |")
    if a1["verdict"] != NOT_TESTED:
        lines += [
            "",
            "Tests: " + "; ".join(f"{k}: {describe(p)} ({p['verdict']})" for k, p in a1["test"]["parts"].items()) + ".",
        ]
    lines += [
        "",
        f"### Verdict on Conjectures 1-2 (U against V, comparatively): **{conj['verdict']}**",
        "",
        f"Rule: {conj['rule']}.",
        "",
        describe(conj["test"]) + "." if conj["verdict"] != NOT_TESTED else f"Not tested: {conj['reason']}.",
        "",
    ]
    force = land.get("cumulative_force", {})
    lines += [
        f"### Verdict on Corollary 1 (Theorem 1's C, measured): **{cor1['verdict']}**",
        "",
        f"Rule: {cor1['rule']}. C = sqrt(d_V) h_bar alpha_bar sum 1/|lambda_i|: h_bar = the largest "
        "||R^T H_t V|| at every 50th epoch after the reference, alpha_bar = ||V^T (theta_ref - theta_final)||.",
        "",
        "| seed | eps | model | d_V | h_bar | alpha_bar | sum 1/lambda | C |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in force.get("per_seed", []):
        for m in LABELS:
            c = f.get(m)
            if c and c["C"] is not None:
                lines.append(
                    f"| {f['seed']} | {c['eps']:.3g} | {LABELS[m]} | {c['d_valley']} | {c['h_bar']:.3g} | "
                    f"{c['alpha_bar']:.3g} | {c['sum_inv_lambda']:.3g} | {c['C']:.3g} |"
                )
    lines += [
        "",
        describe(cor1["test"]) + "." if cor1["verdict"] != NOT_TESTED else f"Not tested: {cor1['reason']}.",
        "",
    ]
    return "\n".join(lines)


def plot_kappa_curves(land: dict, final_epoch: int, path: Path, coupling: dict | None = None) -> None:
    """kappa against eps (relative to the pair's common reference) per seed at the last epoch: Single-Attn
    against Looped-Attn, and the tied Hessian against its diagonal loop part."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    grid = land["eps_grid"]
    for r in land["rows"]:
        if r["epoch"] != final_epoch:
            continue
        for m, color in (("single_attn", "tab:blue"), ("looped_attn", "tab:red")):
            k = [np.nan if x is None else x for x in r["models"][m]["kappa_curve"]]
            axes[0].plot(grid, k, "o-", color=color, alpha=0.6, label=LABELS[m] if r["seed_index"] == 0 else None)
    axes[0].set_title(f"Valley kappa at one eps per pair (epoch {final_epoch}, each seed)")
    for i, row in enumerate((coupling or {}).get("per_seed", [])):
        for part, color in (("full", "tab:red"), ("diagonal", "tab:green")):
            k = [np.nan if x is None else x for x in row["kappa_curves"][part]]
            axes[1].plot(grid, k, "o-", color=color, alpha=0.6, label=f"{part}" if i == 0 else None)
    axes[1].set_title("Looped-Attn: tied Hessian (full) against its diagonal loop part")
    for ax in axes:
        ax.plot(grid, [1 / g for g in grid], "k:", lw=1, label="cap 1/eps (relative)")
        ax.set(xscale="log", yscale="log", xlabel="eps / reference", ylabel="kappa")
        ax.legend(fontsize=8)
    save_figure(fig, path)


# -- the Hessian split by loop pairs (landscape.loops) ------------------------------------------------------
COUPLING_SHAPES_RULE = (
    "Definition 1's shapes (delta = 1): holds if the tied Hessian (full) is V-shaped and the sum of its diagonal "
    "loop blocks (what an untied, unrolled model sees) is U-shaped; partly if both are V-shaped and full's kappa "
    "is at least 10x diagonal's; fails otherwise"
)


def shape_verdict(m: dict) -> str:
    """:data:`COUPLING_SHAPES_RULE`'s outcome for one measurement (``full_shape``, ``diagonal_shape`` and kappas)."""
    full, diag = m["full_shape"], m["diagonal_shape"]
    if full == "V" and diag == "U":
        return "holds"
    if full == "V" and diag == "V" and m["full_kappa"] >= 10 * m["diagonal_kappa"]:
        return "partly"
    return "fails"


COUPLING_SEEDS_RULE = (
    "the per-seed rule on each seed: holds if it holds on every seed, fails if it fails on every seed, partly "
    "where the seeds disagree"
)


def coupling_over_seeds(measured: dict[int, dict]) -> dict:
    """Per seed (``measured``: seed -> :func:`~loopscape.landscape.loops.loop_coupling`'s numbers), the numbers and
    :func:`shape_verdict`; over seeds, :data:`COUPLING_SEEDS_RULE`."""
    per_seed = [
        {"seed": seed, **{k: v for k, v in c.items() if k not in ("top", "trace")}, "verdict": shape_verdict(c)}
        for seed, c in sorted(measured.items())
    ]
    found = {r["verdict"] for r in per_seed}
    return {"seeds": per_seed, "verdict": found.pop() if len(found) == 1 else "partly"}


def coupling_seeds_table(over: dict[str, dict]) -> str:
    """One row per model (``over``: its name -> :func:`coupling_over_seeds`) and seed, then its verdict."""
    share = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731  (None: a zero trace or top eigenvalue)
    lines = [
        "| model | seed | loops | cross share of trace | of top eigenvalue | full kappa, shape | "
        "diagonal kappa, shape | V-valley from coupling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in over.items():
        for r in c["seeds"]:
            lines.append(
                f"| {name} | {r['seed']} | {r['n_loops']} | {share(r['cross_share_trace'])} | "
                f"{share(r['cross_share_top'])} | {r['full_kappa']:.3g}, {r['full_shape']} | "
                f"{r['diagonal_kappa']:.3g}, {r['diagonal_shape']} | {r['verdict']} |"
            )
        lines.append(f"| {name} | over seeds | | | | | | **{c['verdict']}** |")
    return "\n".join(lines)


def coupling_seeds_row(claim: str, name: str, c: dict) -> dict:
    """The verdict row over seeds of one model's :func:`coupling_over_seeds`."""
    ours = "; ".join(
        f"seed {r['seed']}: full {r['full_shape']} (kappa {r['full_kappa']:.3g}), diagonal {r['diagonal_shape']} "
        f"(kappa {r['diagonal_kappa']:.3g})"
        for r in c["seeds"]
    )
    return verdict_row(
        f"{claim} ({len(c['seeds'])} seeds)",
        "Section 4.2 (conjectured)",
        f"{name}: {ours}",
        "conjectured, not shown",
        c["verdict"],
    )


COUPLING_CURVE_RULE = (
    "per tracked seed at the last epoch, Looped-Attn's tied Hessian of the attention weights (full) and its "
    "diagonal loop part cut at one eps = r x full's largest |lambda| for each r in the eps grid; statistic: the "
    "smallest over r of log10(kappa_full / kappa_diagonal); one-sided t-test over seeds, bar log10(2)"
)


def coupling_verdict(coupling: dict) -> dict:
    """ "The V-valley comes from cross-loop coupling", by :data:`COUPLING_CURVE_RULE` over the tracked seeds."""
    name, stat = "cross-loop coupling", "min over eps of log10(kappa_full / kappa_diagonal)"
    rows = coupling.get("per_seed", [])
    if not rows:
        return not_tested(name, stat, "no Looped-Attn run was tracked") | {"rule": COUPLING_CURVE_RULE}
    if rows[0]["epoch"] < PHASE_EPOCH:
        reason = f"spectra tracked to epoch {rows[0]['epoch']}; judged on a trained model, past epoch {PHASE_EPOCH}"
        return not_tested(name, stat, reason) | {"rule": COUPLING_CURVE_RULE}
    values = [r["min_log10_ratio"] for r in rows]
    return directional(values, name=name, statistic=stat, bar=float(np.log10(2))) | {
        "rule": COUPLING_CURVE_RULE,
        "epoch": rows[0]["epoch"],
    }


def coupling_row(verdict: dict) -> dict:
    claim = "Recursion makes the landscape steeper: the V-valley comes from cross-loop coupling"
    ours = evidence(verdict, f"epoch {verdict.get('epoch')}, min log10 kappa ratio per seed")
    return verdict_row(
        claim, "Section 4.2 (conjectured)", ours, "conjectured, not shown", verdict["verdict"], verdict["test"]
    )


def coupling_markdown(coupling: dict) -> str:
    verdict = coupling_verdict(coupling)
    share = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "",
        "## The Hessian split by loop pairs (the V-valley's source)",
        "",
        "The attention weights W_Q, W_K, W_V are shared by the T loops; untied, H = sum_{s,t} H_st. "
        "'diagonal' = sum_t H_tt (an unrolled, untied model), 'cross' = the rest (what tying adds). "
        "Exact, float64; full and diagonal cut at one eps (1e-3 x full's largest |lambda|).",
        "",
        f"### Verdict: **{verdict['verdict']}**",
        "",
        f"Rule: {COUPLING_CURVE_RULE}.",
        "",
        describe(verdict["test"]) + "." if verdict["verdict"] != NOT_TESTED else f"Not tested: {verdict['reason']}.",
        "",
        "| seed | epoch | cross share of trace | of top eigenvalue | full kappa | diagonal kappa | min log10 ratio "
        "over eps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in coupling.get("per_seed", []):
        ratio = "-" if r["min_log10_ratio"] is None else f"{r['min_log10_ratio']:+.3f}"
        lines.append(
            f"| {r['seed']} | {r['epoch']} | {share(r['cross_share_trace'])} | {share(r['cross_share_top'])} | "
            f"{r['full_kappa']:.3g} | {r['diagonal_kappa']:.3g} | {ratio} |"
        )
    lines += [
        "",
        "Along training (first tracked seed):",
        "",
        "| model | epoch | cross share of trace | cross share of top eigenvalue | full kappa, shape "
        "| diagonal kappa, shape |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in coupling.items():
        if not isinstance(v, dict) or "rows" not in v:
            continue
        for r in v["rows"]:
            lines.append(
                f"| {LABELS.get(name, name)} | {r['epoch']} | {share(r['cross_share_trace'])} | "
                f"{share(r['cross_share_top'])} | {r['full_kappa']:.3g}, {r['full_shape']} | "
                f"{r['diagonal_kappa']:.3g}, {r['diagonal_shape']} |"
            )
    lines.append("")
    return "\n".join(lines)


def plot_coupling(coupling: dict, path: Path) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, v in coupling.items():
        if not isinstance(v, dict) or "rows" not in v:
            continue
        rows = v["rows"]
        if v["n_loops"] < 2 or not rows:
            continue
        e = [r["epoch"] for r in rows]
        ax[0].plot(e, [r["cross_share_trace"] for r in rows], "o-", label=f"{LABELS.get(name, name)}: trace")
        ax[0].plot(e, [r["cross_share_top"] for r in rows], "s--", label=f"{LABELS.get(name, name)}: top eigenvalue")
        ax[1].plot(e, [r["full_kappa"] for r in rows], "o-", label="full (tied)")
        ax[1].plot(e, [r["diagonal_kappa"] for r in rows], "s--", label="diagonal (untied)")
    ax[0].set(xlabel="epoch", ylabel="cross-loop share", title="Curvature carried by cross-loop blocks")
    ax[1].axhline(1 + 1.0, color="grey", ls=":", label="U/V threshold (1 + delta)")
    ax[1].set(xlabel="epoch", ylabel="valley kappa", yscale="log", title="Valley condition number")
    for a in ax:
        a.legend(fontsize=8)
    save_figure(fig, path)


UNTIED_RULE = (
    "an intervention: per tracked seed, Looped-Attn's untied control (each loop its own W_Q, W_K, W_V, started at "
    "that seed's Looped-Attn initialisation, trained on the same data and batch order) against Looped-Attn, at the "
    "last epoch, both whole-model Hessians cut at one eps = r x the larger of their largest |lambda| for each r in "
    "the eps grid; statistic: the smallest over r of log10(kappa_tied / kappa_untied); one-sided t-test over seeds, "
    "bar log10(2)"
)


def tied_against_untied(tied, untied) -> dict:
    """kappa over the eps grid of two spectra cut at one eps each time, and the smallest log10 ratio tied/untied."""
    ref = common_eps(tied, untied, rel=1.0)
    curves = {"tied": kappa_curve(tied, ref), "untied": kappa_curve(untied, ref)}
    ratios = [np.log10(a / b) for a, b in zip(curves["tied"], curves["untied"]) if a is not None and b is not None]
    return {"kappa_curves": curves, "min_log10_ratio": min(ratios) if ratios else None}


def untied_control_verdict(rows: list[dict]) -> dict:
    """Tying the loops makes the valley steeper, by :data:`UNTIED_RULE`."""
    name, stat = "untied control", "min over eps of log10(kappa_tied / kappa_untied)"
    if not rows:
        why = f"no control trained: judged on models trained past epoch {PHASE_EPOCH}, on tracked seeds"
        return not_tested(name, stat, why) | {"rule": UNTIED_RULE}
    if rows[0]["epoch"] < PHASE_EPOCH:
        reason = f"trained to epoch {rows[0]['epoch']}; judged on a trained model, past epoch {PHASE_EPOCH}"
        return not_tested(name, stat, reason) | {"rule": UNTIED_RULE}
    return directional([r["min_log10_ratio"] for r in rows], name=name, statistic=stat, bar=float(np.log10(2))) | {
        "rule": UNTIED_RULE
    }


def untied_control_row(verdict: dict) -> dict:
    claim = "Control: tied loops make the valley steeper than the same model unrolled and untied"
    ours = evidence(verdict, "min log10 kappa ratio, tied / untied, per seed")
    return verdict_row(
        claim, "Section 4.2 (conjectured)", ours, "not in the paper", verdict["verdict"], verdict["test"]
    )


def untied_control_markdown(verdict: dict, rows: list[dict]) -> str:
    lines = [
        "",
        f"### The untied control (an intervention): **{verdict['verdict']}**",
        "",
        f"Rule: {UNTIED_RULE}.",
        "",
        describe(verdict["test"]) + "." if verdict["verdict"] != NOT_TESTED else f"Not tested: {verdict['reason']}.",
        "",
        "| seed | kappa tied over eps | kappa untied over eps | min log10 ratio |",
        "|---|---|---|---|",
    ]
    fmt = lambda ks: " / ".join("-" if k is None else f"{k:.3g}" for k in ks)  # noqa: E731
    for r in rows:
        ratio = "-" if r["min_log10_ratio"] is None else f"{r['min_log10_ratio']:+.3f}"
        lines.append(
            f"| {r['seed']} | {fmt(r['kappa_curves']['tied'])} | {fmt(r['kappa_curves']['untied'])} | {ratio} |"
        )
    return "\n".join(lines + [""])
