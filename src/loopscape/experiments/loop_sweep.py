"""`loopscape loop-sweep`: a saved looped model read at every loop count, as ``sweep.json``, figures and
one HTML page: a loopified Hugging Face model (:func:`loopscape.looped.sweep.loop_sweep`), or the
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
from loopscape.io import atomic_write_text, claim_new_run_folder, write_json
from loopscape.looped.exit import EXITS
from loopscape.looped.io import NotLoopedError, from_pretrained, load_tokenizer
from loopscape.looped.sweep import OVERTHINKING_TOLERANCE, Masked, loop_sweep
from loopscape.models.looped_gpt import attention_flops
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
        tokenizer = load_tokenizer(model_path)
        if tokenizer is None:
            raise ConfigError(
                f"--data {data.name}: a .txt file needs the tokenizer saved in --model {str(model_path)!r} "
                "(none there); give a .jsonl file of input_ids instead"
            )
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
    """The loop sweep (:func:`~loopscape.looped.sweep.loop_sweep`) of a looped GPT on its task's test rows
    (``size`` per length, the study's test seeds; one batch per length, scored on the answer positions): per
    loop count over all lengths, as for any looped model, with the attention's FLOPs per token at the widest
    row beside the weights'; per length, the exact match at every count beside ``T(n)``, the loops the task
    gives that length, and the overthinking rule on exact match."""
    batches, depth = [], {}
    for n in lengths:
        b = task.test_batch(n, size, torch.Generator().manual_seed(seed * 1000 + n))
        batches.append({"inputs": b.inputs, "targets": b.targets, "mask": b.mask})
        depth[str(n)] = int(b.n_loops.max())
    result = loop_sweep(model, batches, loops, scorer=Masked())
    counts = [r["n_loops"] for r in result["counts"]]
    width = task.width(max(lengths))
    for row in result["counts"]:
        row["attention_flops_per_token"] = row["n_loops"] * attention_flops(model.config, width)
    per_length = {}
    for n, quality in zip(depth, result.pop("per_batch")):
        em = [q["exact_match"] for q in quality]
        best = counts[em.index(max(em))]
        per_length[n] = {
            "T": depth[n],
            "exact_match": em,
            "best": best,  # the rule on exact match, per length (T(n) differs between lengths)
            "overthinking": best < counts[-1] and em[-1] < max(em) * (1 - OVERTHINKING_TOLERANCE),
        }
    return {
        **result,
        "per_length": per_length,
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
    exit: str = "state",
    layers: tuple[int, int] | None = None,
    context: int = 128,
    max_windows: int = 64,
    exit_loops: int | None = None,
) -> dict:
    """Sweep the model saved in ``model_path`` (a loopified one; ``layers`` loops a plain one first)."""
    if model_path.is_dir() and not (model_path / "config.json").exists() and not list(model_path.glob("*.gguf")):
        if thresholds or layers is not None or data is not None or exit_loops is not None:
            raise ConfigError(
                "--data, --thresholds, --exit-loops and --layers are for Hugging Face models; a looped GPT of an "
                "algorithmic run is read on its task's own test rows"
            )
        return run_looped_gpt_sweep(model_path, loops, out)
    if data is None:
        raise ConfigError("--data is needed for a Hugging Face model (a .txt or .jsonl file)")
    require_extra("transformers", "hf")
    if exit not in EXITS[1:]:
        raise ConfigError(f"--exit must be one of {EXITS[1:]} (got {exit!r})")
    if not (model_path.is_dir() or (model_path.suffix == ".gguf" and model_path.is_file())):
        raise ConfigError(f"--model {str(model_path)!r} must be a local save_pretrained folder or a .gguf file")
    tokens = read_tokens(data, model_path)
    if tokens and isinstance(tokens[0], dict):
        batches = labelled_batches(tokens, max_rows=max_windows * 32)
        read = {"rows_read": sum(len(b["input_ids"]) for b in batches), "rows_total": len(tokens)}
    else:
        batches = windows(tokens, context, max_windows)
        read = {"windows_read": sum(len(b["input_ids"]) for b in batches), "windows_total": len(tokens) // context}
    try:
        model = from_pretrained(model_path, layers=None if layers is None else tuple(layers))
    except NotLoopedError:
        raise ConfigError(
            f"--model {str(model_path)!r} is not loopified: give --layers START,STOP to loop it"
        ) from None
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from None
    claim_new_run_folder(out)
    result = loop_sweep(model, batches, loops, thresholds, exit, exit_loops)
    del result["per_batch"]
    result["model"], result["data"] = str(model_path), str(data)
    result.update(read)
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
    if "windows_read" in result:
        lines += ["", f"Read {result['windows_read']} of the data's {result['windows_total']} windows (--max-windows)."]
    if "rows_read" in result:
        lines += [
            "",
            f"Read {result['rows_read']} of the data's {result['rows_total']} labelled rows (--max-windows x 32).",
        ]
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
