"""`loopscape loop-sweep`: a saved looped Hugging Face model read at every loop count, as ``sweep.json``,
figures and one HTML page (the computation is :func:`loopscape.integrations.loop_sweep.loop_sweep`).

Data: a ``.txt`` file tokenised by the tokenizer saved in the model folder, or a ``.jsonl`` file of
``{"input_ids": [...]}`` rows; cut into windows of ``context`` tokens (at most ``max_windows``).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import yaml

from loopscape.config import ConfigError
from loopscape.extras import require_extra
from loopscape.integrations.loop_sweep import loop_sweep
from loopscape.integrations.loopify import EXITS, loopify
from loopscape.io import atomic_write_text, claim_new_run_folder, write_json
from loopscape.reporting.figures import save_figure
from loopscape.reporting.html import Section, render_report, versions


def read_tokens(data: Path, model_path: Path) -> list[int]:
    """The token ids of ``data`` (see the module docstring); one line naming the file if it cannot be read."""
    if not data.is_file():
        raise ConfigError(f"--data {str(data)!r} does not exist or is not a file")
    if data.suffix == ".jsonl":
        ids = []
        for i, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else {"input_ids": []}
                ids += [int(t) for t in row["input_ids"]]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--data {data.name} line {i} must be a JSON object with input_ids") from None
        return ids
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


def run_loop_sweep(
    model_path: Path,
    data: Path,
    loops: list[int],
    out: Path,
    thresholds: list[float] = (),
    exit: str = "kl",
    layers: tuple[int, int] | None = None,
    context: int = 128,
    max_windows: int = 64,
) -> dict:
    """Sweep the model saved in ``model_path`` (a loopified one; ``layers`` loops a plain one first)."""
    require_extra("transformers", "hf")
    from transformers import AutoModelForCausalLM

    if exit not in EXITS[1:]:
        raise ConfigError(f"--exit must be one of {EXITS[1:]} (got {exit!r})")
    if not model_path.is_dir():
        raise ConfigError(f"--model {str(model_path)!r} must be a local save_pretrained folder")
    batches = windows(read_tokens(data, model_path), context, max_windows)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if layers is not None:
        loopify(model, layers=tuple(layers), n_loops=1)
    elif getattr(model.config, "loopscape", None) is None:
        raise ConfigError(f"--model {str(model_path)!r} is not loopified: give --layers START,STOP to loop it")
    else:
        loopify(model)
    claim_new_run_folder(out)
    result = loop_sweep(model, batches, loops, thresholds, exit)
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
    ax[0].axvline(result["trained_n_loops"], color="grey", ls=":", label="saved n_loops")
    ax[0].set(xlabel="loops", ylabel="perplexity", yscale="log", title="Quality by loop count")
    ax[0].legend(fontsize=8)
    ax[1].plot(range(2, len(result["convergence"]) + 2), result["convergence"], "o-")
    ax[1].set(xlabel="loop t", ylabel="mean ||h_t - h_{t-1}|| / ||h_t||", yscale="log", title="State convergence")
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


def _page(result: dict, figure: Path) -> str:
    lines = ["| loops | perplexity | accuracy | FLOPs/token |", "|---|---|---|---|"]
    lines += [
        f"| {r['n_loops']} | {r['perplexity']:.3f} | {r['accuracy']:.4f} | {r['flops_per_token']:.3g} |"
        for r in result["counts"]
    ]
    if result["exits"]:
        lines += ["", "| exit threshold | mean loops | perplexity | accuracy |", "|---|---|---|---|"]
        lines += [
            f"| {e['threshold']:g} | {e['mean_loops']:.2f} | {e['perplexity']:.3f} | {e['accuracy']:.4f} |"
            for e in result["exits"]
        ]
    flag = "**flagged**" if result["overthinking"] else "not flagged"
    lines += ["", f"Best loop count: {result['best_n_loops']}. Overthinking {flag} ({result['overthinking_rule']})."]
    return render_report(
        "loopscape: loop sweep",
        f"{result['model']} on {result['data']}, read at every loop count.",
        [],
        [Section("sweep", "Loop sweep", "\n".join(lines), [(figure, "Quality, convergence and exits by loop")])],
        yaml.safe_dump({k: result[k] for k in ("model", "data", "trained_n_loops")}, sort_keys=False),
        versions(),
    )
