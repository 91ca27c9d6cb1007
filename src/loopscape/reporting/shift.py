"""Figures, tables and verdicts of the SHIFT study (Section 5, Figure 4).

Verdict rules, stated once here and printed in the report (tests: :mod:`loopscape.reporting.verdicts`):

* **SCP's shift point** (paper: 100-150 epochs): the per-seed shift epochs' mean inside [100, 150] by
  two one-sided t-tests (TOST, alpha 0.05) over the seeds where SCP shifted. A seed where it never
  shifted lies outside the range: then the claim is at best inconclusive, and not reproduced if no
  seed shifted. Not tested on runs shorter than 150 epochs.
* **SHIFT's speed-up at no loss** (paper: about 1.26x, comparable accuracy): two parts, both required
  (intersection-union). Speed-up: FLOPs over the whole run, Looped-Attn's over SHIFT's per seed, the
  log of it > 0 by a one-sided t-test, bar log(1.13) (half the paper's 26%); Looped-Attn epochs saved
  (the paper's measure, ``E / (E - e)``, 600 / (600 - 124) = 1.26) and wall clock beside it. No loss:
  final total accuracy minus Looped-Attn's, per seed, above minus the study's tolerance (0.5 pts) by
  a one-sided non-inferiority test (the lower half of TOST: a gain never fails it); "inconclusive"
  with the interval otherwise. Not tested where SCP never shifted on some seed (that
  run is Single-Attn).
* **E.2.2(b), the accuracy drop at the switch is minimal**: per seed, the accuracy of the last Stage-I
  epoch minus the lowest of the five Stage-II epochs after it; below the same tolerance by the same
  one-sided test (a rise never fails it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter, ScalarFormatter

from loopscape.reporting.figures import plt, save_figure
from loopscape.reporting.html import verdict_row
from loopscape.reporting.stats import fmt_mean_std, fmt_number
from loopscape.reporting.verdicts import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_TESTED,
    REPRODUCED,
    all_of,
    describe,
    directional,
    in_range,
    non_inferiority,
    not_tested,
)

PAPER_SCP = {"shift_range": [100, 150], "speedup": 1.26}


def fixed_epochs(res: dict, optimizer: str) -> list[int]:
    return sorted(
        int(k.split("/")[0]) for k in res["policies"] if k.endswith("/" + optimizer) and k.split("/")[0].isdigit()
    )


def scp_epochs(res: dict, optimizer: str) -> list[int | None]:
    return res["policies"][f"scp/{optimizer}"]["shift_epochs"]


# -- verdicts ---------------------------------------------------------------------------


def scp_point_verdict(epochs: list[int | None], run_epochs: int) -> dict:
    """SCP's shift epochs per seed against the paper's range; ``not tested`` on runs that end before it."""
    lo, hi = PAPER_SCP["shift_range"]
    name, stat = "SCP's shift point", "per-seed shift epoch (the seeds where SCP shifted)"
    if run_epochs < hi:
        reason = f"the runs have {run_epochs} epochs and end before the paper's range {lo}-{hi}"
        return not_tested(name, stat, reason, len(epochs)) | {"median": None, "epochs": epochs}
    shifted = [e for e in epochs if e is not None]
    if not shifted:
        reason = f"SCP never shifted in {run_epochs} epochs on any of {len(epochs)} seeds"
        return not_tested(name, stat, reason, len(epochs)) | {
            "verdict": NOT_REPRODUCED,
            "median": None,
            "epochs": epochs,
        }
    out = in_range(shifted, lo, hi, name=name, statistic=stat)
    if len(shifted) < len(epochs) and out["verdict"] == REPRODUCED:  # a seed that never shifted is outside
        out["verdict"] = INCONCLUSIVE
    return out | {"median": float(np.median(shifted)), "epochs": epochs}


def speedup_verdict(entry: dict, tolerance_pts: float) -> dict:
    """SHIFT with SCP against Looped-Attn by the rule above; ``not tested`` where SCP did not shift on some seed
    (that run is Single-Attn)."""
    rows = entry.get("per_seed", [])
    name = "SHIFT's speed-up at no loss"
    never = sum(r["shift_epoch"] is None for r in rows)
    summary = {
        "looped_epochs_speedup": entry["looped_epochs_speedup"]["mean"],
        "flops_speedup_total": entry["flops_speedup_total"]["mean"],
        "wall_speedup_total": entry["wall_s_speedup_total"]["mean"],
        "wall_speedup_to_target": entry["wall_s_speedup_to_target"]["mean"],
        "acc_all_minus_looped_pts": entry["acc_all_minus_looped"]["mean"],
    }
    if never:  # a run that never shifted is Single-Attn, not SHIFT: there is no SHIFT run to time
        reason = f"SCP never shifted on {never} of {len(rows)} seeds: those runs are Single-Attn"
        return not_tested(name, "speed-up and no loss", reason, len(rows)) | summary
    parts = {
        "speed-up (FLOPs)": directional(
            [np.log(r["flops_speedup_total"]) for r in rows],
            name=name,
            statistic="log FLOPs speed-up over Looped-Attn",
            bar=float(np.log(1 + (PAPER_SCP["speedup"] - 1) / 2)),
        ),
        "no loss": non_inferiority(
            [r["acc_all_minus_looped"] for r in rows],
            tolerance_pts,
            name=name,
            statistic="final accuracy minus Looped-Attn's (pts)",
        ),
    }
    out = all_of(parts, name=name, statistic="speed-up and no loss (intersection-union)")
    return out | summary | {"reason": out.get("reason")}


def drop_verdict(entry: dict, tolerance_pts: float) -> dict:
    """E.2.2(b): the accuracy drop at the switch within the tolerance (TOST over seeds)."""
    drops = [r["drop_at_shift_pts"] for r in entry.get("per_seed", [])]
    name, stat = "accuracy drop at the switch", "minus the drop: lowest of the 5 epochs after the switch - last before"
    if not [v for v in drops if v is not None]:
        return not_tested(name, stat, "SCP switched inside no run")
    out = non_inferiority([None if d is None else -d for d in drops], tolerance_pts, name=name, statistic=stat)
    return out | {"drops": drops}


# -- figures ----------------------------------------------------------------------------


def plot_shift_points(res: dict, optimizer: str, path: Path) -> None:
    """Figure 4: speed-up against Looped-Attn and final accuracy per shift epoch, SCP marked."""
    fixed = fixed_epochs(res, optimizer)
    pol = {e: res["policies"][f"{e}/{optimizer}"] for e in fixed}
    scp = res["policies"][f"scp/{optimizer}"]
    scp_e = [e for e in scp["shift_epochs"] if e is not None]
    scp_x = float(np.mean(scp_e)) if scp_e else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for key, label, style in (
        ("wall_s_speedup_to_target", "wall time to target", "o-"),
        ("wall_s_speedup_total", "wall time, all epochs", "s--"),
        ("flops_speedup_to_target", "FLOPs to target", "^-"),
        ("flops_speedup_total", "FLOPs, all epochs", "v--"),
    ):
        y = [pol[e][key]["mean"] if pol[e][key]["mean"] is not None else np.nan for e in fixed]
        line = ax.plot(fixed, y, style, label=label, ms=4)[0]
        if scp_x is not None and scp[key]["mean"] is not None:
            ax.plot([scp_x], [scp[key]["mean"]], "*", ms=14, color=line.get_color(), mec="k")
    ax.axhline(1, color="grey", lw=0.8)
    ax.axhline(PAPER_SCP["speedup"], color="grey", ls=":", lw=1, label=f"paper: {PAPER_SCP['speedup']}x")
    ax.set(
        xlabel="shift epoch (0 = Looped-Attn)",
        ylabel="speed-up vs Looped-Attn (log scale)",
        yscale="log",
        title="SHIFT speed-up (stars: SCP)",
    )
    # plain numbers on the log axis (1.2, 1.5, 2, ...), not powers of ten
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if round(10 * y) % 5 == 0 else ""))
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=3, frameon=False)
    ax = axes[1]
    for g, color in (("acc_all", "tab:blue"), ("acc_low", "tab:green"), ("acc_high", "tab:red")):
        m = np.array([pol[e][g]["mean"] for e in fixed])
        sd = np.array([pol[e][g]["std"] for e in fixed])
        ax.plot(fixed, m, "o-", color=color, ms=4, label=g.replace("acc_", ""))
        ax.fill_between(fixed, m - sd, m + sd, color=color, alpha=0.15)
        if scp_x is not None:
            ax.plot([scp_x], [scp[g]["mean"]], "*", ms=14, color=color, mec="k")
    ax.set(xlabel="shift epoch", ylabel="final training accuracy (%)", title="Final accuracy (mean ± std over seeds)")
    ax.legend(fontsize=9, title="IC group")
    save_figure(fig, path)


def plot_compute_curves(res: dict, optimizer: str, path: Path) -> None:
    """Accuracy against cumulative compute (wall time and FLOPs): Looped-Attn, SCP and late shifts."""
    members = res["members"]
    acc = np.array(res["curves"]["acc_all"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fixed = fixed_epochs(res, optimizer)
    shown = (
        [("0", "Looped-Attn", "k")]
        + [("scp", "SHIFT (SCP)", "tab:orange")]
        + [(str(fixed[-1]), f"SHIFT @ {fixed[-1]}", "tab:purple")]
    )
    for ax, clock, label in (
        (axes[0], "wall_s", "cumulative training wall time (s)"),
        (axes[1], "flops", "cumulative training FLOPs"),
    ):
        cum = np.array(res["cumulative"][clock])
        for policy, name, color in shown:
            idx = [i for i, m in enumerate(members) if m["policy"] == policy and m["optimizer"] == optimizer]
            for j, i in enumerate(idx):
                ax.plot(cum[i], 100 * acc[i], color=color, lw=0.8, alpha=0.7, label=name if j == 0 else None)
        ax.axhline(100 * res["target_acc_all"], color="grey", ls=":", lw=1, label="target")
        ax.set(xlabel=label, ylabel="training accuracy, all (%)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


# -- markdown ---------------------------------------------------------------------------


def shift_markdown(res: dict, shift_cfg, run_epochs: int) -> tuple[str, dict]:
    """The section, and the verdicts on SCP's shift point and SHIFT's speed-up."""
    opt = shift_cfg.optimizer
    tol_pts = 100 * shift_cfg.tolerance
    scp_v = scp_point_verdict(scp_epochs(res, opt), run_epochs)
    speed_v = speedup_verdict(res["policies"][f"scp/{opt}"], tol_pts)
    drop_v = drop_verdict(res["policies"][f"scp/{opt}"], tol_pts)
    lo, hi = PAPER_SCP["shift_range"]
    lines = [
        "# SHIFT (Section 5, Figure 4)",
        "",
        f"Target: Looped-Attn's mean final training accuracy minus {tol_pts:.1f} pts = "
        f"{100 * res['target_acc_all']:.2f}%. "
        f"One epoch costs {res['epoch_flops']['1']:,} FLOPs as Single-Attn and "
        f"{res['epoch_flops'][max(res['epoch_flops'], key=int)]:,} as Looped-Attn (analytic, training forward + "
        "backward); "
        f"measured {1e3 * res['epoch_wall_s']['1']:.1f} ms and "
        f"{1e3 * res['epoch_wall_s'][max(res['epoch_wall_s'], key=int)]:.1f} ms (median training time per epoch, 1 "
        "thread). "
        "Speed-ups are Looped-Attn's cost over SHIFT's, per seed against the Looped-Attn run of the same seed, "
        "mean ± std.",
        "",
        "| policy | shift epochs | Looped-Attn epochs saved (paper's measure) | FLOPs speed-up, all epochs "
        "| wall speed-up to target | wall speed-up, all epochs | FLOPs speed-up to target "
        "| final acc all (%) | high IC (%) | all minus Looped (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in res["policies"].items():
        if not key.endswith("/" + opt):
            continue
        lines.append(
            f"| {key.split('/')[0]} | {e['shift_epochs']} | {fmt_mean_std(e['looped_epochs_speedup'])} | "
            f"{fmt_mean_std(e['flops_speedup_total'])} | {fmt_mean_std(e['wall_s_speedup_to_target'])} (reached "
            f"{e['wall_s_speedup_to_target']['reached']}) | "
            f"{fmt_mean_std(e['wall_s_speedup_total'])} | {fmt_mean_std(e['flops_speedup_to_target'])} | "
            f"{fmt_mean_std(e['acc_all'])} | "
            f"{fmt_mean_std(e['acc_high'])} | {fmt_mean_std(e['acc_all_minus_looped'])} |"
        )
    other = shift_cfg.other_optimizer
    lines += [
        "",
        f"### Adam's moments at the switch: {opt} (default) against {other}",
        "",
        "| policy | final acc all, keep | final acc all, reset | high IC, keep | high IC, reset |",
        "|---|---|---|---|---|",
    ]
    for p in shift_cfg.compare_optimizer:
        k, r = res["policies"][f"{p}/keep"], res["policies"][f"{p}/reset"]
        lines.append(
            f"| {p} | {fmt_mean_std(k['acc_all'])} | {fmt_mean_std(r['acc_all'])} | {fmt_mean_std(k['acc_high'])} | "
            f"{fmt_mean_std(r['acc_high'])} |"
        )
    checks = res["checks"]
    lines += [
        "",
        "Check: the population trainer's Looped-Attn (shift 0) against the Markov study's Looped-Attn runs, same "
        "seeds: max |difference| in accuracy "
        f"{checks['population_vs_single_model_trainer_max_abs_diff_acc_all']:.2g}.",
    ]
    if "measured_scp_run" in checks:
        m = checks["measured_scp_run"]
        lines.append(
            f"Check: one SCP SHIFT run trained end to end (seed {m['seed']}, shift at {m['shift_epoch']}): measured "
            f"{m['measured_wall_s']:.1f} s of training, "
            f"the accounting predicts {m['predicted_wall_s']:.1f} s."
        )
    lines += [
        "",
        f"## Verdict on SCP's shift point: **{scp_v['verdict']}**",
        "",
        f"SCP (P = {shift_cfg.scp.patience}, delta_1 = {shift_cfg.scp.min_delta}, W = {shift_cfg.scp.wait}, delta_2 "
        f"= {shift_cfg.scp.grad_tol} (coefficient of variation), "
        f"max wait {shift_cfg.scp.max_wait}) shifted at epochs {scp_v['epochs']} (median "
        f"{fmt_number(scp_v['median'], 0)}); "
        f"paper: {lo}-{hi}. "
        f"Rule: the mean shift epoch inside [{lo}, {hi}] by TOST over the seeds where SCP shifted (a seed that "
        "never shifted lies outside the range: at best inconclusive).",
        f"Not tested: {scp_v['reason']}." if scp_v["verdict"] == NOT_TESTED else describe(scp_v["test"]) + ".",
        "",
        f"## Verdict on SHIFT's speed-up at no loss: **{speed_v['verdict']}**",
        *([f"Not tested: {speed_v['reason']}.", ""] if speed_v["verdict"] == NOT_TESTED else [""]),
        f"SCP's mean speed-up in Looped-Attn epochs saved (the paper's measure, Stage I free): "
        f"{fmt_number(speed_v['looped_epochs_speedup'])}x (paper: about {PAPER_SCP['speedup']}x = 600 / (600 - 124)); "
        f"FLOPs over the whole run {fmt_number(speed_v['flops_speedup_total'])}x (the tested measure) and wall clock "
        f"{fmt_number(speed_v['wall_speedup_total'])}x (to the target {fmt_number(speed_v['wall_speedup_to_target'])}x"
        f"; {load_note(res)}); final accuracy {fmt_number(speed_v['acc_all_minus_looped_pts'])} pts against "
        f"Looped-Attn (tolerance {tol_pts:.1f}). "
        "Rule: both parts by tests over seeds: the log FLOPs speed-up > 0 (one-sided t, bar log 1.13, half the "
        f"paper's 26%) and the accuracy difference above -{tol_pts:.1f} pts (one-sided non-inferiority, the lower "
        "half of TOST); 'inconclusive' when its interval straddles the margin.",
        "",
        *[f"- {k}: {describe(p)} ({p['verdict']})" for k, p in speed_v.get("test", {}).get("parts", {}).items()],
        "",
        f"## Verdict on E.2.2(b), the accuracy drop at the switch is minimal: **{drop_v['verdict']}**",
        "",
        f"Per seed (SCP runs): the accuracy of the last Stage-I epoch minus the lowest of the 5 Stage-II epochs "
        f"after it; below {tol_pts:.1f} pts by a one-sided non-inferiority test over seeds. "
        + (f"Not tested: {drop_v['reason']}." if drop_v["verdict"] == NOT_TESTED else describe(drop_v["test"]) + "."),
        "",
    ]
    return "\n".join(lines), {"scp_shift_point": scp_v, "shift_speedup": speed_v, "drop_at_shift": drop_v}


def load_note(res: dict) -> str:
    """The machine's load beside a wall-clock figure (the figure moves with it)."""
    load = res.get("machine_load")
    if not load:
        return "machine load not recorded"
    one, five, fifteen = load["loadavg"]
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {load['cpus']} cores"


def verdict_rows(verdicts: dict) -> list[dict]:
    """SHIFT's rows of a report's verdict table."""
    point, speed = verdicts["scp_shift_point"], verdicts["shift_speedup"]
    lo, hi = PAPER_SCP["shift_range"]
    shown = ", ".join("never" if e is None else str(e) for e in point["epochs"])
    ours = point["reason"] if point["median"] is None else f"median {point['median']:g} (epochs {shown})"
    rows = [
        verdict_row(f"SCP shifts at {lo}-{hi} epochs", "Section 5", ours, f"{lo}-{hi}", point["verdict"], point["test"])
    ]
    if speed["verdict"] == NOT_TESTED:
        ours = speed["reason"]
    else:
        ours = (
            f"{fmt_number(speed['flops_speedup_total'])}x FLOPs ({fmt_number(speed['looped_epochs_speedup'])}x in "
            f"Looped-Attn epochs, {fmt_number(speed['wall_speedup_total'])}x wall time), "
            f"{speed['acc_all_minus_looped_pts']:+.2f} pts; parts: "
            + ", ".join(f"{k} {w}" for k, w in speed["parts"].items())
        )
    claim = "SHIFT reaches Looped-Attn's accuracy faster, at no loss"
    paper = f"about {PAPER_SCP['speedup']}x, no loss"
    rows.append(verdict_row(claim, "Section 5, Figure 4", ours, paper, speed["verdict"], speed["test"]))
    drop = verdicts.get("drop_at_shift")
    if drop is not None:
        ours = (
            drop["reason"]
            if drop["verdict"] == NOT_TESTED
            else "drop per seed (pts): " + ", ".join("-" if d is None else f"{d:+.2f}" for d in drop["drops"])
        )
        claim = "The accuracy drop at the switch is minimal"
        rows.append(verdict_row(claim, "Appendix E.2.2 (b)", ours, "minimal", drop["verdict"], drop["test"]))
    return rows
