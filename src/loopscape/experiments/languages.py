"""Score Markov languages (data seeds) by the paper's data facts alone, with no training.

``loopscape languages --seeds 0-399`` writes ``OUT/languages.md`` and
``OUT/languages.json``: every seed's largest training IC, simple-sequence
shares at the test lengths, Bayes ceiling, bigram rule and headroom per IC
group, ranked by :data:`loopscape.data.languages.RULE`; and the feasibility
table (the share of random languages, under each open data reading, that
allows the paper's reported training numbers at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import track

from loopscape.config import require, require_seeds
from loopscape.data.languages import (
    PAPER_IC_MAX,
    PAPER_REPORTED,
    PAPER_SIMPLE_SHARE,
    RULE,
    feasibility,
    rank_languages,
)
from loopscape.data.markov import DEFAULT_LANGUAGE_SEED, MarkovDataConfig
from loopscape.io import atomic_write_text, prepare_run_folder, write_json
from loopscape.reporting.stats import fmt_number


@dataclass
class LanguagesConfig:
    """``loopscape languages``: the data settings (the seed is replaced by each scored seed) and the seeds."""

    data: MarkovDataConfig = field(default_factory=MarkovDataConfig)
    seeds: list[int] = field(default_factory=lambda: list(range(400)))
    n_feasibility: int = 500  # random languages per data reading in the feasibility table

    def validate(self, p: str = "") -> None:
        require_seeds(self.seeds, f"{p}seeds")
        require(self.n_feasibility >= 1, f"{p}n_feasibility", "an integer >= 1", self.n_feasibility)


def _row(r: dict, lengths: list[int]) -> str:
    h = r["headroom"]
    shares = " / ".join(f"{100 * r['simple_share'][L]:.1f}" for L in lengths)
    return (
        f"| {r['seed']} | {r['ic_max']:.2f} | {shares} | {fmt_number(r['share_error_pts'])} | "
        f"{100 * h['low']['bayes_ceiling']:.1f} | {100 * h['all']['bayes_ceiling']:.1f} | "
        f"{100 * h['high']['bayes_ceiling']:.1f} | {100 * h['all']['headroom']:.1f} | "
        f"{100 * h['high']['headroom']:.1f} | {'yes' if r['eligible'] else 'no: ' + r['why_not']} |"
    )


def languages_markdown(rows: list[dict], feasible: list[dict], data: MarkovDataConfig, top: int = 20) -> str:
    lengths = list(data.test_lengths)
    best = rows[0]
    header = " / ".join(str(L) for L in lengths)
    paper = " / ".join(f"{100 * PAPER_SIMPLE_SHARE[L]:.1f}" for L in lengths if L in PAPER_SIMPLE_SHARE)
    n_ok = sum(r["eligible"] for r in rows)
    lines = [
        "# Markov languages scored by the paper's data facts (no training)",
        "",
        f"{len(rows)} languages (data seeds {rows and min(r['seed'] for r in rows)}-"
        f"{max(r['seed'] for r in rows)}), {data.rows} rows, test targets {data.test_targets}, "
        f"{data.n_test} test draws per length. Paper: largest training IC {PAPER_IC_MAX} bits, simple share at "
        f"L = {header}: {paper}%, 'perfect accuracy' on low-IC sequences.",
        "",
        f"Rule: {RULE}",
        "",
        f"**Best fit: data seed {best['seed']}** ({n_ok} of {len(rows)} eligible); the default `data.seed` is "
        f"{DEFAULT_LANGUAGE_SEED}.",
        "",
        f"| seed | largest IC (bits) | simple share L = {header} (%) | share error (pts) | Bayes low (%) "
        "| Bayes all (%) | Bayes high (%) | headroom all (pts) | headroom high (pts) | eligible |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, lengths) for r in rows[:top]]
    lines += [
        "",
        f"Headroom = Bayes ceiling minus the bigram rule's accuracy (argmax_y T_{data.length - 1}[x_last, y]) on the "
        f"training set; the first {min(top, len(rows))} rows by rank are shown, all are in languages.json.",
        "",
        "## Feasibility: what the paper's reported numbers require of the data",
        "",
        f"The share of random languages whose training set allows, jointly: the Bayes-optimal predictor >= "
        f"{100 * PAPER_REPORTED['low']:.0f}% on low-IC, >= {100 * PAPER_REPORTED['all']:.2f}% on all and >= "
        f"{100 * PAPER_REPORTED['high']:.2f}% on high-IC sequences (Table 1, Observation 1), a high-IC headroom >= "
        f"{100 * PAPER_REPORTED['high_headroom']:.1f} pts, and a largest IC within 3 bits of {PAPER_IC_MAX}.",
        "",
        "| rows | training set | languages | low | all | high | high headroom | largest IC | jointly |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in feasible:
        s = f["share"]
        lines.append(
            f"| {f['rows']} | {'all 81 + draws' if f['include_all'] else 'draws only'} | {f['n']} | "
            + " | ".join(f"{100 * s[k]:.1f}%" for k in ("low", "all", "high", "high_headroom", "ic_max", "jointly"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def run_languages(cfg: LanguagesConfig, out: Path, show_progress: bool = True) -> dict:
    """Rank ``cfg.seeds`` by the rule, compute the feasibility table, and write both into ``out``."""
    prepare_run_folder(out, cfg, resume=False)
    seeds = track(cfg.seeds, description="scoring languages") if show_progress else cfg.seeds
    rows = rank_languages(cfg.data, seeds)
    feasible = feasibility(cfg.data, cfg.n_feasibility)
    write_json(out / "languages.json", {"rule": RULE, "ranked": rows, "feasibility": feasible})
    markdown = languages_markdown(rows, feasible, cfg.data)
    atomic_write_text(out / "languages.md", markdown)
    return {"ranked": rows, "feasibility": feasible, "markdown": markdown}
