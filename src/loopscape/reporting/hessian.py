"""Hessian study of the Markov runs: Figures 3c, 3d, 9b, 9c, landscape table, verdicts.

Observation 2 rule (stated in every report). On the Matrix Entropy curve
``E(e)`` of each model (mean over tracked seeds), with ``c`` a tenth of the
largest entropy either curve reaches. (Not of the largest possible entropy,
``log(n_bins)``: on one binning for the whole run the early, largest ``|λ|``
set the bin width and later spectra fill few bins, so the curves stay far
below ``log(n_bins)`` and a collapse of ``0.1 log(n_bins)`` could not happen
even when the curve falls by two thirds. A rule must be able to come out
either way on the curves it judges.)

* Single-Attn **static**: ``max E - min E`` over epochs >= 10 is at most ``c``.
* Looped-Attn **collapse**: ``min E`` over epochs 1..150 is below ``E(1)`` by at least ``c``.
* Looped-Attn **diversification**: after that minimum, ``E`` rises above it by at least ``c``.
* Looped-Attn **stabilisation**: ``max E - min E`` over the last 100 epochs is at most ``c``.

Reproduced if all four hold; partly if Single-Attn is static or Looped-Attn
shows at least two of its three phases; not reproduced otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loopscape.landscape.river_valley import assumption1, valley_diagnostics
from loopscape.landscape.spectrum import trajectory_metrics
from loopscape.reporting.figures import LABELS, PHASE_EPOCH, plt, save_figure
from loopscape.reporting.html import NOT_TESTED, verdict_row

STABLE_EPOCHS = 100  # Looped-Attn's stabilisation: its entropy's range over the last 100 epochs
SNAPSHOTS = {"single_attn": [10, 50, 100, 150], "looped_attn": [1, 50, 60, 150, 170, 400]}
OBS2_RULE = (
    "c = a tenth of the largest Matrix Entropy either model reaches. Single-Attn static: range of E over epochs "
    ">= 10 <= c. Looped-Attn collapse: min E over "
    f"epochs 1..{PHASE_EPOCH} <= E(1) - c; diversification: E rises >= c above that minimum later; stabilisation: "
    "range of E over the "
    "last 100 epochs <= c. Reproduced if all four hold; partly if Single-Attn is static or Looped-Attn shows >= 2 "
    "phases."
)


def trajectories(
    spectra: dict[str, list[tuple[np.ndarray, np.ndarray]]], n_bins: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per model: epochs and ME / MI curves averaged over tracked seeds."""
    out = {}
    for model, runs in spectra.items():
        epochs = runs[0][0]
        mets = [trajectory_metrics(list(eigs), n_bins) for _, eigs in runs]
        out[model] = {"epochs": epochs, **{k: np.mean([m[k] for m in mets], axis=0) for k in mets[0]}}
    return out


def observation2_verdict(traj: dict[str, dict[str, np.ndarray]], n_bins: int) -> dict:
    """The rule above; ``not tested`` unless the tracked epochs reach the stabilisation window
    after the phase boundary (``PHASE_EPOCH + STABLE_EPOCHS``)."""
    s, lp = traj["single_attn"], traj["looped_attn"]
    es, el = s["entropy"], lp["entropy"]
    ep_s, ep_l = s["epochs"], lp["epochs"]
    c = 0.1 * float(max(es.max(), el.max()))
    needed = PHASE_EPOCH + STABLE_EPOCHS
    if ep_l[-1] < needed or ep_s[-1] < needed:
        last = int(min(ep_l[-1], ep_s[-1]))
        reason = f"spectra tracked to epoch {last}; the three phases need {needed} (collapse by {PHASE_EPOCH}, then "
        reason += f"{STABLE_EPOCHS} epochs to stabilise)"
        return {"verdict": NOT_TESTED, "reason": reason, "rule": OBS2_RULE, "c": c}
    if c <= 1e-3 * np.log(n_bins):  # every spectrum in one bin: no shape to judge
        reason = "every Matrix Entropy is ~0 (the whole spectrum in one histogram bin): the binning cannot see it"
        return {"verdict": NOT_TESTED, "reason": reason, "rule": OBS2_RULE, "c": c}
    static = bool(float(np.ptp(es[ep_s >= 10])) <= c) if (ep_s >= 10).any() else False
    early = (ep_l >= 1) & (ep_l <= PHASE_EPOCH)
    e1 = el[ep_l >= 1][0] if (ep_l >= 1).any() else el[0]
    i_min = int(np.flatnonzero(early)[np.argmin(el[early])]) if early.any() else 0
    collapse = bool(early.any() and el[i_min] <= e1 - c)
    diversification = bool(i_min + 1 < len(el) and el[i_min + 1 :].max() >= el[i_min] + c)
    last = ep_l > ep_l[-1] - STABLE_EPOCHS
    stabilisation = bool(float(np.ptp(el[last])) <= c)
    phases = int(collapse) + int(diversification) + int(stabilisation)
    if static and phases == 3:
        verdict = "reproduced"
    elif static or phases >= 2:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    return {
        "verdict": verdict,
        "rule": OBS2_RULE,
        "c": c,
        "single_static": static,
        "single_entropy_range_after_10": float(np.ptp(es[ep_s >= 10])) if (ep_s >= 10).any() else None,
        "looped_collapse": collapse,
        "looped_diversification": diversification,
        "looped_stabilisation": stabilisation,
        "looped_entropy_min_epoch": int(ep_l[i_min]),
    }


def verdict_rows(observation2: dict, landscape: dict) -> list[dict]:
    """Observation 2's and Assumption 1's rows of a report's verdict table."""
    o2 = observation2
    if o2["verdict"] == NOT_TESTED:
        ours = o2["reason"]
    else:
        ours = (
            f"Single-Attn static {o2['single_static']}; Looped-Attn collapse {o2['looped_collapse']}, "
            f"diversification {o2['looped_diversification']}, stabilisation {o2['looped_stabilisation']}"
        )
    claim = "Observation 2: Single-Attn's Hessian static; Looped-Attn's collapses, diversifies, stabilises"
    rows = [verdict_row(claim, "Section 4.1", ours, "Figures 3c, 3d", o2["verdict"])]
    a1 = landscape["assumption1"]
    claim = "Assumption 1: Looped-Attn has more low-curvature directions (V-valley)"
    if PHASE_EPOCH not in a1:
        tracked = ", ".join(str(e) for e in a1) or "none"
        ours = f"judged at epoch {PHASE_EPOCH} and at the end; compared at epochs: {tracked}"
        rows.append(verdict_row(claim, "Section 4.2", ours, "assumed", NOT_TESTED))
    else:
        ours = ", ".join(f"epoch {e}: m {a['m_single']} vs {a['m_looped']}" for e, a in a1.items())
        verdict = "holds" if all(a["holds"] for a in a1.values()) else "fails"
        rows.append(verdict_row(claim, "Section 4.2", ours, "assumed", verdict))
    return rows


def landscape_table(spectra: dict, epochs: list[int]) -> dict:
    """Valley diagnostics per model at the given epochs (first tracked seed), and Assumption 1."""
    table, a1 = {}, {}
    for e in epochs:
        eig = {}
        for model, runs in spectra.items():
            ep, eigs = runs[0]
            if e in ep:
                eig[model] = eigs[list(ep).index(e)]
                table.setdefault(model, {})[e] = valley_diagnostics(eig[model]).as_dict()
        if len(eig) == 2:
            a1[e] = assumption1(eig["single_attn"], eig["looped_attn"])
    return {"valley": table, "assumption1": a1}


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


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def observation2_details(verdict: dict) -> str:
    """What the rule found, or why it was not applied."""
    if verdict["verdict"] == NOT_TESTED:
        return f"Not tested: {verdict['reason']}."
    return (
        f"Single-Attn static: {verdict['single_static']} (entropy range after epoch 10: "
        f"{_num(verdict['single_entropy_range_after_10'])}, c = {verdict['c']:.3f}); "
        f"Looped-Attn collapse: {verdict['looped_collapse']} (minimum at epoch {verdict['looped_entropy_min_epoch']}), "
        f"diversification: {verdict['looped_diversification']}, stabilisation: {verdict['looped_stabilisation']}."
    )


def hessian_markdown(verdict: dict, land: dict, n_bins: int) -> str:
    lines = [
        "## Hessian-level dynamics (Observation 2, Assumption 1)",
        "",
        "Exact spectra of the training-loss Hessian (float64) every tracked epoch; Matrix Entropy and Mutual "
        "Information "
        f"on {n_bins} equal |lambda| bins, one binning for the whole run (histogram variant; docs/markov.md).",
        "",
        f"### Verdict on Observation 2: **{verdict['verdict']}**",
        "",
        f"Rule: {verdict['rule']}",
        "",
        observation2_details(verdict),
        "",
        "| model | epoch | river dim | valley dim | kappa | U/V | m_tau (tau=0.5) | sqrt(d_V) sum 1/lambda |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, per in land["valley"].items():
        for e, d in per.items():
            lines.append(
                f"| {LABELS[model]} | {e} | {d['n_river']} | {d['d_valley']} | {d['kappa']:.3g} | {d['shape']} | "
                f"{d['m_tau']} | {d['spectral_force']:.3g} |"
            )
    force = land.get("cumulative_force", {})
    if any(m in force for m in LABELS):
        lines += [
            "",
            "Theorem 1's cumulative force C = sqrt(d_V) h_bar alpha_bar sum 1/|lambda_i|, measured: river/valley "
            "basis fixed at epoch "
            f"{force['reference_epoch']}, h_bar = largest ||R^T H_t V|| at every 50th epoch after it, alpha_bar = "
            "||V^T (theta_ref - theta_final)||.",
            "",
            "| model | d_V | h_bar | alpha_bar | sum 1/lambda | C |",
            "|---|---|---|---|---|---|",
        ]
        for m in LABELS:
            f = force.get(m)
            if f and f["C"] is not None:
                lines.append(
                    f"| {LABELS[m]} | {f['d_valley']} | {f['h_bar']:.3g} | {f['alpha_bar']:.3g} | "
                    f"{f['sum_inv_lambda']:.3g} | {f['C']:.3g} |"
                )
        if all(force.get(m) and force[m]["C"] for m in LABELS):
            ratio = force["looped_attn"]["C"] / force["single_attn"]["C"]
            status = "holds" if ratio >= 10 else "direction only" if ratio > 1 else "fails"
            lines.append(
                f"\nCorollary 1 (C of Looped-Attn >> C of Single-Attn): ratio {ratio:.3g}: **{status}** "
                "(rule: holds at >= 10x, 'direction only' between 1x and 10x, fails below 1x)."
            )
    lines += [
        "",
        "| epoch | m_single | m_looped | (a) m_looped > m_single | (b) dominance | Assumption 1 |",
        "|---|---|---|---|---|---|",
    ]
    for e, a in land["assumption1"].items():
        lines.append(
            f"| {e} | {a['m_single']} | {a['m_looped']} | {a['dimension']} | {a['dominance']} | "
            f"{'holds' if a['holds'] else 'fails'} |"
        )
    lines.append("")
    return "\n".join(lines)


# -- the Hessian split by loop pairs (landscape.loops) ------------------------------------------------------
COUPLING_SHAPES_RULE = (
    "Definition 1's shapes (delta = 1): holds if the tied Hessian (full) is V-shaped and the sum of its diagonal "
    "loop blocks (what an untied, unrolled model sees) is U-shaped; partly if both are V-shaped and full's kappa "
    "is at least 10x diagonal's; fails otherwise"
)
COUPLING_RULE = f"at Looped-Attn's last tracked epoch (past {PHASE_EPOCH}), with {COUPLING_SHAPES_RULE}"


def shape_verdict(m: dict) -> str:
    """:data:`COUPLING_RULE`'s outcome for one measurement (``full_shape``, ``diagonal_shape`` and kappas)."""
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
    """Per seed (``measured``: seed -> :func:`coupling_summary`-style numbers), the numbers and
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


def final_model_coupling(lh, k: int = 5) -> dict:
    """A final model's exact split (``lh``: a :class:`~loopscape.landscape.loops.LoopHessian`) as a study keeps
    it: its loops and weights, and :func:`coupling_summary` of the top ``k`` (at most the weights)."""
    return {
        "n_loops": lh.n_loops,
        "params": lh.shape[0],
        **coupling_summary(lh.measure(k=min(k, lh.shape[0]), exact=True)),
    }


def coupling_summary(m: dict) -> dict:
    """The numbers a report keeps of one :meth:`~loopscape.landscape.loops.LoopHessian.measure`."""
    return {
        "cross_share_trace": m["cross_share_trace"],
        "cross_share_top": m["cross_share_top"],
        **{f"{part}_{key}": m[part]["valley"][key] for part in ("full", "diagonal") for key in ("kappa", "shape")},
        "top": {part: m[part]["top"] for part in ("full", "diagonal", "cross")},
        "trace": {part: m[part]["trace"] for part in ("full", "diagonal", "cross")},
    }


def coupling_verdict(coupling: dict) -> dict:
    """ "The V-valley comes from cross-loop coupling", by :data:`COUPLING_RULE`."""
    looped = [v for v in coupling.values() if isinstance(v, dict) and v.get("n_loops", 1) > 1 and v["rows"]]
    if not looped:
        return {"verdict": NOT_TESTED, "reason": "no Looped-Attn run was tracked", "rule": COUPLING_RULE}
    last = looped[0]["rows"][-1]
    if last["epoch"] < PHASE_EPOCH:
        reason = f"spectra tracked to epoch {last['epoch']}; judged on a trained model, past epoch {PHASE_EPOCH}"
        return {"verdict": NOT_TESTED, "reason": reason, "rule": COUPLING_RULE}
    verdict = shape_verdict(last)
    return {
        "verdict": verdict,
        "epoch": last["epoch"],
        **{k: last[k] for k in last if k not in ("top", "trace")},
        "rule": COUPLING_RULE,
    }


def coupling_row(verdict: dict) -> dict:
    claim = "Recursion makes the landscape steeper: the V-valley comes from cross-loop coupling"
    if verdict["verdict"] == NOT_TESTED:
        return verdict_row(claim, "Section 4.2 (conjectured)", verdict["reason"], "conjectured, not shown", NOT_TESTED)
    share = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731  (None: a zero trace or top eigenvalue)
    ours = (
        f"epoch {verdict['epoch']}: full {verdict['full_shape']} (kappa {verdict['full_kappa']:.3g}), diagonal "
        f"{verdict['diagonal_shape']} (kappa {verdict['diagonal_kappa']:.3g}); cross-loop share of the trace "
        f"{share(verdict['cross_share_trace'])}, of the top eigenvalue {share(verdict['cross_share_top'])}"
    )
    return verdict_row(claim, "Section 4.2 (conjectured)", ours, "conjectured, not shown", verdict["verdict"])


def coupling_markdown(coupling: dict) -> str:
    verdict = coupling_verdict(coupling)
    lines = [
        "",
        "## The Hessian split by loop pairs (the V-valley's source)",
        "",
        "The attention weights W_Q, W_K, W_V are shared by the T loops; untied, H = sum_{s,t} H_st. "
        "'diagonal' = sum_t H_tt (an unrolled, untied model), 'cross' = the rest (what tying adds). "
        "Exact, float64, first tracked seed.",
        "",
        f"Verdict: **{verdict['verdict']}**"
        + (f" ({verdict['reason']})" if "reason" in verdict else "")
        + f". Rule: {COUPLING_RULE}.",
        "",
        "| model | epoch | cross share of trace | cross share of top eigenvalue | full kappa, shape "
        "| diagonal kappa, shape |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in coupling.items():
        for r in v["rows"]:
            share = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
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
