"""One self-contained HTML report: Markdown sections rendered to HTML, figures
embedded as PNG data, a verdict table on top, configuration and versions below."""

from __future__ import annotations

import base64
import html
import platform
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from markdown_it import MarkdownIt

from loopscape.reporting.verdicts import (
    ALPHA,
    NOT_TESTED,  # noqa: F401  (re-exported: the studies import it from here)
    POSITIVE,
    WORD_MEANINGS,
    WORDS,
    rules_version,
)

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1150px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: 6px; margin-top: 40px; }
h2 { margin-top: 28px; } h3 { margin-top: 22px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tr:nth-child(even) td { background: #fbfcfd; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; background: #f6f8fa; }
pre { padding: 10px 12px; overflow-x: auto; border-radius: 6px; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 13px; color: #57606a; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         white-space: nowrap; }
.reproduced { background: #dafbe1; color: #116329; } .partly { background: #fff8c5; color: #7d4e00; }
.not { background: #ffebe9; color: #a40e26; } .info { background: #ddf4ff; color: #0550ae; }
nav a { margin-right: 14px; } .lead { color: #57606a; }
"""


@dataclass
class Section:
    """One part of a report: Markdown, then its figures ``(path, caption)``."""

    anchor: str
    title: str
    markdown: str
    figures: list[tuple[Path, str]] = field(default_factory=list)


# the words of reporting.verdicts, and the older ones the algorithmic study's per-model shape rule still uses
VERDICTS = (*WORDS, "partly reproduced", "holds", "fails", "partly")
_EMPTY = re.compile(r"\b(nan|None)\b")


def verdict_row(claim: str, source: str, ours: str, paper: str, verdict: str, test: dict | None = None) -> dict:
    """A row of a verdict table. A verdict needs its evidence shown: every cell is a
    non-empty text with no ``None`` or ``nan`` in it (``"not tested"`` puts its reason in ``ours``).
    ``test``: the test behind the word (:func:`loopscape.reporting.verdicts.test_fields`)."""
    row = {"claim": claim, "source": source, "ours": ours, "paper": paper, "verdict": verdict}
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS} (got {verdict!r})")
    for key, text in row.items():
        if not isinstance(text, str) or not text.strip() or _EMPTY.search(text):
            raise ValueError(f"verdict row {claim!r}: the {key} cell is empty or holds no number ({text!r})")
    if test is not None:
        if verdict in POSITIVE and test.get("null_rate") is not None and test["null_rate"] > ALPHA + 1e-9:
            raise ValueError(f"verdict row {claim!r}: a positive word with a null rate above {ALPHA}")
        row["test"] = test
    return row


@dataclass
class StudyReport:
    """What a study hands to a report: its numbers (JSON-able), its verdict rows
    (``claim``, ``source``, ``ours``, ``paper``, ``verdict``) and its section.
    ``memory`` holds what later studies read from this one and is not written."""

    results: dict
    verdicts: list[dict]
    section: Section
    memory: dict = field(default_factory=dict)


def badge(verdict: str) -> str:
    cls = (
        "reproduced"
        if verdict in ("reproduced", "holds")
        else "partly"
        if verdict.startswith(("partly", "direction", "reading"))
        else "not"
        if verdict.startswith(("not r", "fails", "contradicted"))
        else "info"
    )
    return f'<span class="badge {cls}">{html.escape(verdict)}</span>'


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def test_cells(test: dict | None) -> str:
    """A verdict row's test as table cells: name and statistic, interval, p, seeds, null rate, detectable."""
    if not test:
        return "<td>-</td>" * 6
    interval = "-" if test.get("interval") is None else "[" + ", ".join(_num(x) for x in test["interval"]) + "]"
    cells = [
        f"{test['name']}: {test['statistic']}",
        interval,
        _num(test.get("p_value")),
        str(test.get("n_seeds", "-")),
        _num(test.get("null_rate")),
        _num(test.get("min_detectable")),
    ]
    return "".join(f"<td>{html.escape(c)}</td>" for c in cells)


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_report(
    title: str, lead: str, verdicts: list[dict], sections: list[Section], config_yaml: str, versions: dict[str, str]
) -> str:
    """``verdicts``: rows with ``claim``, ``source``, ``ours``, ``paper``, ``verdict``."""
    md = MarkdownIt("commonmark").enable("table")
    rows = "".join(
        f"<tr><td>{html.escape(v['claim'])}</td><td>{html.escape(v['source'])}</td><td>{html.escape(v['ours'])}</td>"
        f"<td>{html.escape(v['paper'])}</td><td>{badge(v['verdict'])}</td>{test_cells(v.get('test'))}</tr>"
        for v in verdicts
    )
    rules = rules_version()
    words = "".join(f"<li>{badge(w)} {html.escape(m)}</li>" for w, m in WORD_MEANINGS.items())
    rules_note = (
        f"<p class='lead'>Every verdict is a test stated before the outcome (module <code>{rules['module']}</code>, "
        f"last commit {html.escape(str(rules['last_commit'] or 'unknown: not a git checkout'))}, "
        f"SHA-256 {rules['sha256']}): alpha {ALPHA}, one-sided over seeds where the claim has a direction, "
        "non-inferiority (the lower half of TOST) for 'no loss', TOST for a range. The null rate is how often the "
        "same rule says 'reproduced' when the claim is false at its boundary (computed exactly, with the run's "
        "seeds and noise); 'detectable' is the smallest true effect it finds at 80% power.</p>"
        f"<ul class='lead'>{words}</ul>"
    )
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="lead">{html.escape(lead)}</p>',
        f"<nav>{nav}<a href='#config'>Configuration</a></nav>",
        "<h2>Verdicts</h2>",
        "<table><tr><th>claim</th><th>paper</th><th>ours</th><th>paper's "
        "number</th><th>verdict</th><th>test</th><th>90% interval</th><th>p</th><th>seeds</th><th>null rate</th>"
        f"<th>detectable</th></tr>{rows}</table>",
        rules_note,
    ]
    for s in sections:
        body.append(f'<section id="{s.anchor}">')
        body.append(md.render(s.markdown))
        body += [_figure(p, c) for p, c in s.figures if Path(p).exists()]
        body.append("</section>")
    vers = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in versions.items())
    body += [
        '<h1 id="config">Configuration and versions</h1>',
        f"<pre>{html.escape(config_yaml)}</pre>",
        f"<table>{vers}</table>",
    ]
    head = (
        '<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style>"
    )
    return f'<!doctype html><html lang="en"><head>{head}</head><body>{"".join(body)}</body></html>'


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages behind a report."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("loopscape", "torch", "numpy", "scipy", "matplotlib", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
