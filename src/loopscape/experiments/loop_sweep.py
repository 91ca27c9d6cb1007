"""`loopscape loop-sweep`: a saved looped model read at every loop count, as ``sweep.json``, figures and
one HTML page: a loopified Hugging Face model (:func:`loopscape.integrations.loop_sweep.loop_sweep`), or the
looped GPT of a ``loopscape algorithmic`` run (:func:`looped_gpt_sweep`, on the task's own test rows).

Data: a ``.txt`` file tokenised by the tokenizer saved in the model folder, or a ``.jsonl`` file of
``{"input_ids": [...]}`` rows; cut into windows of ``context`` tokens (at most ``max_windows``). Rows that
also hold ``labels`` (Hugging Face's convention: the model shifts them, -100 is not scored; e.g. a task's
answer positions, as ``loopscape retrofit`` writes them) are kept as rows, batched by length, scored on their
labels only and by exact match too.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import yaml

from loopscape.config import ConfigError
from loopscape.extras import require_extra
from loopscape.integrations.loop_sweep import (
    OVERTHINKING_RULE,
    OVERTHINKING_TOLERANCE,
    loop_sweep,
    overthinking,
    quality_summary,
)
from loopscape.integrations.loopify import EXITS, loopify
from loopscape.io import atomic_write_text, claim_new_run_folder, write_json
from loopscape.models.looped_gpt import flops_per_token_step
from loopscape.reporting.figures import save_figure
from loopscape.reporting.html import Section, render_report, versions


def read_tokens(data: Path, model_path: Path) -> list[int] | list[dict]:
    """The token ids of ``data``, or its labelled rows (see the module docstring); one line naming the file
    if it cannot be read."""
    if not data.is_file():
        raise ConfigError(f"--data {str(data)!r} does not exist or is not a file")
    if data.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row = {k: [int(t) for t in row[k]] for k in ("input_ids", "labels") if k in row or k == "input_ids"}
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--data {data.name} line {i} must be a JSON object with input_ids") from None
            if "labels" in row and len(row["labels"]) != len(row["input_ids"]):
                raise ConfigError(f"--data {data.name} line {i}: labels must be as long as input_ids")
            rows.append(row)
        if any("labels" in r for r in rows):
            return [r if "labels" in r else {**r, "labels": r["input_ids"]} for r in rows]
        return [t for r in rows for t in r["input_ids"]]
    if data.suffix == ".txt":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError):
            raise ConfigError(
                f"--data {data.name}: a .txt file needs the tokenizer saved in --model {str(model_path)!r} "
                "(none there); give a .jsonl file of input_ids instead"
            ) from None
        return tokenizer(data.read_text(encoding="utf-8"))["input_ids"]
    raise ConfigError(f"--data must end in .txt or .jsonl (got {data.name!r})")


def windows(ids: list[int], context: int, max_windows: int, batch_size: int = 8) -> list[dict]:
    n = min(len(ids) // context, max_windows)
    if n < 1:
        raise ConfigError(f"--data must hold at least context={context} tokens (got {len(ids)})")
    rows = torch.tensor(ids[: n * context]).view(n, context)
    return [{"input_ids": rows[i : i + batch_size]} for i in range(0, n, batch_size)]


def labelled_batches(rows: list[dict], max_rows: int, batch_size: int = 32) -> list[dict]:
    """Labelled rows in batches of one length each (no padding), at most ``max_rows`` rows."""
    rows, by_length = rows[:max_rows], {}
    for r in rows:
        by_length.setdefault(len(r["input_ids"]), []).append(r)
    return [
        {k: torch.tensor([r[k] for r in group[i : i + batch_size]]) for k in ("input_ids", "labels")}
        for _, group in sorted(by_length.items())
        for i in range(0, len(group), batch_size)
    ]


@torch.no_grad()
def looped_gpt_sweep(model, task, lengths: list[int], loops: list[int], size: int, seed: int) -> dict:
    """The loop sweep of a looped GPT on its task's test rows (``size`` per length, the study's test seeds):
    per loop count, over all lengths, the perplexity and accuracy of the answer tokens, the exact match of
    rows and the forward FLOPs per token; per length, the exact match at every count beside ``T(n)``, the
    loops the task gives that length. The logit lens is the sweep itself (the block ends in the final norm,
    so loop ``t``'s state read out is the model run at ``t`` loops); convergence as for Hugging Face models."""
    model.eval()
    top, counts = max(loops), sorted(set(loops))
    totals = {k: [0, 0, 0, 0, 0] for k in counts}
    per_length, change, tokens = {}, [0.0] * (top - 1), 0
    for n in lengths:
        b = task.test_batch(n, size, torch.Generator().manual_seed(seed * 1000 + n))
        e, h, states = model.embed(b.inputs), None, []
        for _ in range(top):
            h = model.step(h, e)
            states.append(h)
        per_length[str(n)] = {"T": int(b.n_loops.max()), "exact_match": []}
        for k in counts:
            logp = model.head(states[k - 1]).double().log_softmax(-1)
            hit = logp.argmax(-1) == b.targets
            right = (hit | ~b.mask).all(-1)
            nll = -logp.gather(-1, b.targets[..., None])[..., 0][b.mask].sum().item()
            row = [nll, hit[b.mask].sum().item(), int(b.mask.sum()), int(right.sum()), len(right)]
            totals[k] = [x + y for x, y in zip(totals[k], row)]
            per_length[str(n)]["exact_match"].append(right.float().mean().item())
        for t in range(1, top):
            a, c = states[t - 1], states[t]
            change[t - 1] += ((c - a).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-30)).sum().item()
        tokens += b.inputs.numel()
    width = task.width(max(lengths))
    rows = [
        {
            "n_loops": k,
            **quality_summary(totals[k], True),
            "flops_per_token": k * flops_per_token_step(model.config, width),
        }
        for k in counts
    ]
    best, flagged = overthinking(rows)
    for row in per_length.values():  # the rule on exact match, per length (T(n) differs between lengths)
        em = row["exact_match"]
        top_em = max(em)
        row["best"] = counts[em.index(top_em)]
        row["overthinking"] = row["best"] < counts[-1] and em[-1] < top_em * (1 - OVERTHINKING_TOLERANCE)
    lens = [{"loop": r["n_loops"], **{k: r[k] for k in ("perplexity", "accuracy", "exact_match")}} for r in rows]
    return {
        "counts": rows,
        "logit_lens": lens,
        "convergence": [c / tokens for c in change],
        "exits": [],
        "per_length": per_length,
        "best_n_loops": best,
        "overthinking": flagged,
        "overthinking_rule": OVERTHINKING_RULE,
        "overthinking_lengths": [int(n) for n, r in per_length.items() if r["overthinking"]],
        "best_at_T": [int(n) for n, r in per_length.items() if r["best"] == r["T"]],
        "trained_n_loops": "T(n)",
    }


def run_looped_gpt_sweep(run_dir: Path, loops: list[int], out: Path, size: int = 256) -> dict:
    """Sweep the looped GPT of a ``loopscape algorithmic`` paradigm folder (``run_dir``: ``.../looped`` or
    ``.../shift``, its study's ``config.yaml`` one level up) on the study's test lengths."""
    from dataclasses import replace

    from loopscape.config import load_config
    from loopscape.experiments.algorithmic import AlgorithmicStudyConfig, build
    from loopscape.training.checkpoint import load_weights

    if not (run_dir / "model.safetensors").is_file() or not (run_dir.parent / "config.yaml").is_file():
        raise ConfigError(
            f"--model {str(run_dir)!r} must be a Hugging Face save_pretrained folder or a paradigm folder of a "
            "finished `loopscape algorithmic` run (model.safetensors, and config.yaml one level up)"
        )
    config = load_config(AlgorithmicStudyConfig, run_dir.parent / "config.yaml")
    config = replace(config, train=replace(config.train, device="cpu"))
    task, model = build(config, torch.device("cpu"))
    load_weights(run_dir / "model.safetensors", model)
    claim_new_run_folder(out)
    result = looped_gpt_sweep(model, task, config.test_lengths, loops, size, config.seed)
    result["model"], result["data"] = str(run_dir), f"{config.task} test rows, lengths {config.test_lengths}"
    write_json(out / "sweep.json", result)
    figure = out / "figures" / "loop_sweep.png"
    plot_sweep(result, figure)
    plot_per_length(result, out / "figures" / "per_length.png")
    atomic_write_text(out / "report.html", _page(result, figure, out / "figures" / "per_length.png"))
    return result


def plot_per_length(result: dict, path: Path) -> None:
    """Exact match by test length and loop count, with ``T(n)`` marked."""
    lengths = list(result["per_length"])
    counts = [r["n_loops"] for r in result["counts"]]
    grid = [result["per_length"][n]["exact_match"] for n in lengths]
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")  # columns: the counts swept
    marks = [(counts.index(r["T"]), i) for i, r in enumerate(result["per_length"].values()) if r["T"] in counts]
    ax.plot([x for x, _ in marks], [y for _, y in marks], "w+", ms=9, label="T(n)")
    ax.set_xticks(range(len(counts)), counts)
    if len(counts) > 16:
        ax.tick_params(axis="x", labelsize=6)
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set(xlabel="loops", ylabel="test length n", title="Exact match by length and loop count")
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def run_loop_sweep(
    model_path: Path,
    data: Path | None,
    loops: list[int],
    out: Path,
    thresholds: list[float] = (),
    exit: str = "kl",
    layers: tuple[int, int] | None = None,
    context: int = 128,
    max_windows: int = 64,
    exit_loops: int | None = None,
) -> dict:
    """Sweep the model saved in ``model_path`` (a loopified one; ``layers`` loops a plain one first)."""
    if model_path.is_dir() and not (model_path / "config.json").exists():
        if thresholds or layers is not None or data is not None or exit_loops is not None:
            raise ConfigError(
                "--data, --thresholds, --exit-loops and --layers are for Hugging Face models; a looped GPT of an "
                "algorithmic run is read on its task's own test rows"
            )
        return run_looped_gpt_sweep(model_path, loops, out)
    if data is None:
        raise ConfigError("--data is needed for a Hugging Face model (a .txt or .jsonl file)")
    require_extra("transformers", "hf")
    from transformers import AutoModelForCausalLM

    if exit not in EXITS[1:]:
        raise ConfigError(f"--exit must be one of {EXITS[1:]} (got {exit!r})")
    if not model_path.is_dir():
        raise ConfigError(f"--model {str(model_path)!r} must be a local save_pretrained folder")
    tokens = read_tokens(data, model_path)
    if tokens and isinstance(tokens[0], dict):
        batches = labelled_batches(tokens, max_rows=max_windows * 32)
    else:
        batches = windows(tokens, context, max_windows)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if layers is not None:
        loopify(model, layers=tuple(layers), n_loops=1)
    elif getattr(model.config, "loopscape", None) is None:
        raise ConfigError(f"--model {str(model_path)!r} is not loopified: give --layers START,STOP to loop it")
    else:
        loopify(model)
    claim_new_run_folder(out)
    result = loop_sweep(model, batches, loops, thresholds, exit, exit_loops)
    result["model"], result["data"] = str(model_path), str(data)
    write_json(out / "sweep.json", result)
    figure = out / "figures" / "loop_sweep.png"
    plot_sweep(result, figure)
    atomic_write_text(out / "report.html", _page(result, figure))
    return result


def plot_sweep(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    counts = result["counts"]
    ax[0].plot([r["n_loops"] for r in counts], [r["perplexity"] for r in counts], "o-", label="run at k loops")
    lens = result["logit_lens"]
    ax[0].plot([r["loop"] for r in lens], [r["perplexity"] for r in lens], "s--", alpha=0.7, label="logit lens")
    if isinstance(result["trained_n_loops"], int):  # a looped GPT's loops depend on the length: T(n)
        ax[0].axvline(result["trained_n_loops"], color="grey", ls=":", label="saved n_loops")
    ax[0].set(xlabel="loops", ylabel="perplexity", yscale="log", title="Quality by loop count")
    ax[0].legend(fontsize=8)
    ax[1].plot(range(2, len(result["convergence"]) + 2), result["convergence"], "o-")
    ax[1].set(
        xlabel="loop t", ylabel="relative change", yscale="log", title="State convergence ||h_t - h_{t-1}|| / ||h_t||"
    )
    for e in result["exits"]:
        loops_used = [int(k) for k in e["histogram"]]
        ax[2].bar(loops_used, list(e["histogram"].values()), alpha=0.5, label=f"{e['threshold']:g}")
    ax[2].set(
        xlabel="loops used",
        ylabel="tokens",
        title=f"Exit histogram ({result['exits'][0]['exit']})"
        if result["exits"]
        else "Exit histogram (no thresholds given)",
    )
    if result["exits"]:
        ax[2].legend(title="threshold", fontsize=8)
    save_figure(fig, path)


def _page(result: dict, figure: Path, per_length_figure: Path | None = None) -> str:
    exact = "exact_match" in result["counts"][0]
    em = lambda r: f" {r['exact_match']:.4f} |" if exact else ""  # noqa: E731
    lines = ["| loops | perplexity | accuracy |" + (" exact match |" if exact else "") + " FLOPs/token |"]
    lines += ["|---|---|---|" + ("---|" if exact else "") + "---|"]
    lines += [
        f"| {r['n_loops']} | {r['perplexity']:.3f} | {r['accuracy']:.4f} |{em(r)} {r['flops_per_token']:.3g} |"
        for r in result["counts"]
    ]
    if result["exits"]:
        lines += ["", "| exit threshold | mean loops | perplexity | accuracy |" + (" exact match |" if exact else "")]
        lines += ["|---|---|---|---|" + ("---|" if exact else "")]
        full = next((r for r in result["counts"] if r["n_loops"] == result["exit_loops"]), None)
        if full is not None:  # the same model without exit, at the exits' most loops
            lines.append(
                f"| full depth | {full['n_loops']} | {full['perplexity']:.3f} | {full['accuracy']:.4f} |{em(full)}"
            )
        lines += [
            f"| {e['threshold']:g} | {e['mean_loops']:.2f} | {e['perplexity']:.3f} | {e['accuracy']:.4f} |{em(e)}"
            for e in result["exits"]
        ]
        lines += ["", f"Exits: at most {result['exit_loops']} loops; mean loops over the scored tokens."]
    if "per_length" in result:
        counts = [r["n_loops"] for r in result["counts"]]
        lines += [
            "",
            "Exact match by test length (rows) and loop count (columns); T(n) in bold. Per length, the same rule "
            "on exact match: highest at a count below the largest swept, and more than 1% lower at the largest.",
            "",
            f"Best at T(n) for lengths {result['best_at_T']}; overthinking flagged for lengths "
            f"{result['overthinking_lengths']}.",
            "",
        ]
        lines += ["| n | T(n) | " + " | ".join(map(str, counts)) + " |", "|---|---|" + "---|" * len(counts)]
        for n, row in result["per_length"].items():
            cells = [f"**{v:.2f}**" if k == row["T"] else f"{v:.2f}" for k, v in zip(counts, row["exact_match"])]
            lines.append(f"| {n} | {row['T']} | " + " | ".join(cells) + " |")
    flag = "**flagged**" if result["overthinking"] else "not flagged"
    lines += ["", f"Best loop count: {result['best_n_loops']}. Overthinking {flag} ({result['overthinking_rule']})."]
    figures = [(figure, "Quality, convergence and exits by loop")]
    if per_length_figure is not None:
        figures.append((per_length_figure, "Exact match by test length and loop count"))
    return render_report(
        "loopscape: loop sweep",
        f"{result['model']} on {result['data']}, read at every loop count.",
        [],
        [Section("sweep", "Loop sweep", "\n".join(lines), figures)],
        yaml.safe_dump({k: result[k] for k in ("model", "data", "trained_n_loops")}, sort_keys=False),
        versions(),
    )
