"""Command-line interface: ``loopscape <command>``, ten commands.

- ``reproduce``: the whole Markov section of the paper (studies, theory, SHIFT, Table 1) as one HTML report.
- ``markov``: Single-Attn vs Looped-Attn on the Markov language (Section 4.1; Figures 3, 9; Observations 1-2).
- ``languages``: score Markov languages (data seeds) by the paper's data facts alone, with no training.
- ``length-readings``: Table 1 under the readings of attention, position codes and test targets the paper leaves open.
- ``retrofit``: loop the middle layers of a trained decoder and continue it (Appendix B; the [hf] extra).
- ``loop-sweep``: read a looped model at every loop count: perplexity, accuracy, exits, overthinking.
- ``lm-eval``: lm-evaluation-harness's command line with the ``loopscape`` model type (the [eval] extra).
- ``sweep``: sweep the settings the paper leaves open and report which reproduce Observation 1.
- ``theory``: Theorems 1-3 and Corollaries 1-2 on random River-Valley instances and the toy models.
- ``algorithmic``: Single-Attn, Looped-Attn and SHIFT on an algorithmic task (Appendix E.2; Figures 11, 14).

Each command imports its study when it runs, not at module top: the studies
bring torch and matplotlib, which ``loopscape --help`` should not wait for
(docs/architecture.md has the measurement).

The run commands take ``--output DIR``, a config file (YAML or TOML) and
``--set key.sub=value`` overrides, most also ``--seeds`` and ``--epochs``; a
flag and a ``--set`` that give one setting different values are refused.
Every command is registered by :func:`command`, which holds the one error
policy: bad input (a :class:`~loopscape.config.ConfigError` or any
``ValueError``: a bad setting, flag, file or run folder) stops with one line
naming the field and what is allowed, exit code 2 (click's usage error); a
run that fails (divergence, a full disk, memory, a dead worker, a missing
extra) stops with one line, exit code 1. Never a traceback for either.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import typer

from loopscape.config import ConfigError, load_config, parse_override, preset_file
from loopscape.errors import DivergenceError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Looped transformers, their loss landscapes, and SHIFT."
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML or TOML file with settings.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting, e.g. --set train.batch_size=64 (repeatable).")
SeedsOpt = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (overrides `seeds`).")
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs (overrides `train.epochs`).")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run in --output.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"loopscape {version('loopscape')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print loopscape's version and exit."
    ),
) -> None:
    """Looped transformers, their loss landscapes, and SHIFT."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    seeds = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            first, dash, last = part.partition("-") if not part.startswith("-") else (part, "", "")
            seeds += list(range(int(first), int(last) + 1)) if dash else [int(part)]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers or ranges like 0-399 (got {text!r})") from None
    return seeds


# how a flag's value, as typed, reads as its setting's value (others: as typed)
PARSE = {
    "--seeds": parse_seeds,
    "--paradigm": lambda text: [p.strip() for p in text.split(",") if p.strip()],
    "--quick": lambda _: "quick",
}
_MISSING = object()


def overrides(sets: list[str] | None, *flags: tuple[str, str, object]) -> dict:
    """``--set`` pairs, then each flag given as ``(option, setting, value as typed)``, e.g.
    ``("--epochs", "train.epochs", 40)`` (``None`` or ``False``: not given).

    A flag and a ``--set`` that give one setting different values are refused with one line naming both
    (the same value is fine)."""
    given = [(text, *parse_override(text)) for text in sets or []]
    pairs = {key: value for _, key, value in given}
    for option, key, typed in flags:
        if typed is None or typed is False:
            continue
        value = PARSE.get(option, lambda x: x)(typed)
        found = _set_value(key, given)
        if found is not None and not _same(found[0], value):
            shown = option if typed is True else f"{option} {typed}"
            raise ConfigError(f"{shown} and --set {found[1]} set {key} to different values; give one of them")
        pairs[key] = value
    return pairs


def _set_value(key: str, given: list[tuple[str, str, object]]) -> tuple[object, str] | None:
    """What the ``--set`` pairs, applied in order, make of setting ``key``: (value, the ``--set`` text), or
    ``None`` where they leave it alone (or give its section a value that is no table: load_config says so)."""
    found = None
    for text, k, v in given:
        if k == key:
            found = (v, text)
        elif key.startswith(k + "."):  # --set train={epochs: 5}
            for part in key[len(k) + 1 :].split("."):
                v = v.get(part, _MISSING) if isinstance(v, dict) else _MISSING
            found = None if v is _MISSING else (v, text)
        elif k.startswith(key + "."):  # --set train.epochs.x=1: something inside the flag's setting
            found = (_MISSING, text)
    return found


def _same(a: object, b: object) -> bool:
    """One value, given by a ``--set`` (``a``, read as YAML) and a flag (``b``)."""
    if isinstance(b, list) and not isinstance(a, list):
        a = [a]  # --set seeds=3 reads as [3]
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a == b or Path(a) == Path(b)  # --set model_path=ckpt/ and --model ckpt
    return a == b and isinstance(a, bool) == isinstance(b, bool)


# what a command reports in one line instead of a traceback: bad input (exit 2), then a run that failed (exit 1)
BAD_INPUT = (ConfigError, ValueError)
FAILURES = (*BAD_INPUT, DivergenceError, OSError, MemoryError, BrokenProcessPool, ImportError)


def _fail(err: Exception) -> None:
    """One line on standard error; exit 2 for bad input (any ``ValueError``), 1 for a run that failed."""
    if isinstance(err, BrokenProcessPool):
        text = "a worker process died (killed by the system: out of memory?); lower the sizes or `workers`"
    elif isinstance(err, MemoryError):
        text = "out of memory; lower the sizes (data sets, batch size, width) or `workers`"
    elif isinstance(err, OSError) and not isinstance(err, ConfigError):
        where = f" {err.filename}" if err.filename else ""
        text = f"cannot read or write{where}: {err.strerror or err}"
    else:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    typer.secho(f"error: {text}", fg="red", err=True)
    raise typer.Exit(2 if isinstance(err, BAD_INPUT) else 1)


def command(name: str | None = None, **settings):
    """``@app.command(...)`` with the one error policy every command shares (module docstring): what
    :data:`FAILURES` names ends in one line on standard error, exit 2 for bad input, 1 for a failed run."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FAILURES as err:
                _fail(err)

        return app.command(name, **settings)(run)

    return register


def _output(kind: str, output: Path | None, resume: bool) -> Path:
    """The run folder: ``--output``, or ``runs/<kind>-<time>`` (``--resume`` needs ``--output``)."""
    if resume and output is None:
        raise ConfigError("--resume needs --output naming the run folder to continue")
    return output or Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@command()
def reproduce(
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default runs/reproduce-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = typer.Option(
        None, "--seeds", help="Comma-separated seeds of the Markov and SHIFT studies (overrides `markov.seeds`)."
    ),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        "-s",
        help="Override a setting, e.g. --set markov.train.epochs=300 or --set shift.optimizer=reset (repeatable).",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Everything on a small scale (about 70 s on 2 cores; for CI and a first look). "
        "Numbers are not comparable to the paper's.",
    ),
    languages: int | None = typer.Option(
        None,
        "--languages",
        help="Run the whole report on each of the K best-fitting eligible languages and give every verdict as a "
        "distribution over them (OUT/languages.md; K full runs).",
    ),
    resume: bool = ResumeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The whole Markov section of the paper: sample-level and Hessian study, theory, SHIFT (Figure 4),
    length generalisation (Table 1), as one HTML report."""
    from loopscape.experiments.reproduce import ReproduceConfig, run_over_languages, run_reproduce

    files = [preset_file("reproduce-quick.yaml")] if quick else []
    pairs = overrides(set_, ("--quick", "scale", quick), ("--seeds", "markov.seeds", seeds))
    cfg = load_config(ReproduceConfig, files + ([config] if config else []), pairs)
    out = _output("reproduce", output, resume)
    if languages is not None:
        result = run_over_languages(cfg, out, languages, resume=resume, show_progress=not quiet)
        typer.echo(result["markdown"])
        typer.echo(f"Verdicts over languages: {out / 'languages.md'}")
        return
    report = run_reproduce(cfg, out, resume=resume, show_progress=not quiet)
    for v in report["verdicts"]:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}")
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'report.json'}")


@command()
def markov(
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder (default runs/markov-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = SeedsOpt,
    epochs: int | None = EpochsOpt,
    set_: list[str] | None = SetOpt,
    resume: bool = ResumeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Section 4.1: Single-Attn vs Looped-Attn on the Markov language; accuracy per IC group and
    Hessian spectra (Figures 3a-3d, 9b, 9c; Observations 1-2)."""
    from loopscape.experiments.markov import MarkovStudyConfig, run_markov_study

    pairs = overrides(set_, ("--seeds", "seeds", seeds), ("--epochs", "train.epochs", epochs))
    cfg = load_config(MarkovStudyConfig, config, pairs)
    out = _output("markov", output, resume)
    study = run_markov_study(cfg, out, resume=resume, show_progress=not quiet)
    for v in study.verdicts:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}: {v['ours']}")
    typer.echo(f"Report: {out / 'summary.md'}  Figures: {out / 'figures'}")


@command()
def languages(
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default runs/languages-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = typer.Option(None, "--seeds", help="Data seeds to score, e.g. 0-399 or 0,5,24."),
    set_: list[str] | None = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score Markov languages (data seeds) by the paper's data facts alone, with no training: largest
    training IC, simple-sequence shares, low-IC Bayes ceiling, headroom over the bigram rule."""
    from loopscape.experiments.languages import LanguagesConfig, run_languages

    cfg = load_config(LanguagesConfig, config, overrides(set_, ("--seeds", "seeds", seeds)))
    out = _output("languages", output, False)
    result = run_languages(cfg, out, show_progress=not quiet)
    typer.echo(result["markdown"])
    typer.echo(f"Table: {out / 'languages.md'}  Numbers: {out / 'languages.json'}")


@command("length-readings")
def length_readings(
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Run folder (default runs/length-readings-<time>)."
    ),
    config: Path | None = ConfigOpt,
    seeds: str | None = SeedsOpt,
    epochs: int | None = EpochsOpt,
    set_: list[str] | None = SetOpt,
    resume: bool = ResumeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Table 1 under the readings the paper leaves open: attention with or without 1/n, position codes
    cyclic / absolute / none, test targets cyclic or aligned (a `loopscape markov` config)."""
    from loopscape.experiments.length import run_length_readings
    from loopscape.experiments.markov import MarkovStudyConfig

    pairs = overrides(set_, ("--seeds", "seeds", seeds), ("--epochs", "train.epochs", epochs))
    cfg = load_config(MarkovStudyConfig, config, pairs)
    out = _output("length-readings", output, resume)
    study = run_length_readings(cfg, out, resume=resume, show_progress=not quiet)
    for row in study.results["readings"]:
        typer.echo(
            f"{row['verdict']['verdict']:>18}  attention {row['attention']}, positions {row['positions']}, "
            f"test targets {row['test_targets']}{' (default)' if row['default'] else ''}"
        )
    typer.echo(f"Table: {out / 'length_readings.md'}")


@command()
def retrofit(
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder (default runs/retrofit-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = SeedsOpt,
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A pretrained causal LM (a GGUF file, or a save_pretrained folder). With --data: retrofitted "
        "recurrence on that text; alone: the checkpoint as Stage I of the task study.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="A UTF-8 text file, or 'pydoc' (CPython's pydoc topics), to train --model on."
    ),
    set_: list[str] | None = SetOpt,
    resume: bool = ResumeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Appendix B: loop the middle layers of a trained decoder and continue, against continuing it plain
    (needs the \\[hf] extra). With --model and --data: a pretrained model on real text at equal training FLOPs
    (docs/integrations.md); else a small decoder trained on a task first, and a looped model from scratch too."""
    if model is not None and data is not None:
        from loopscape.experiments.retrofit_lm import LMRetrofitConfig, run_lm_retrofit

        pairs = overrides(
            set_, ("--seeds", "seeds", seeds), ("--model", "model_path", str(model)), ("--data", "data_path", str(data))
        )
        cfg = load_config(LMRetrofitConfig, config, pairs)
        if output is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--output must name the run folder under torchrun (each process would name its own)")
        out = _output("retrofit", output, resume)
        result = run_lm_retrofit(cfg, out, resume=resume, show_progress=not quiet)
    else:
        from loopscape.experiments.retrofit import RetrofitConfig, run_retrofit

        if resume:
            raise ConfigError("--resume goes with --model and --data (the task study runs in minutes: run it again)")
        pairs = overrides(
            set_,
            ("--seeds", "seeds", seeds),
            ("--model", "model_path", str(model) if model else None),
            ("--data", "data_path", str(data) if data else None),
        )
        cfg = load_config(RetrofitConfig, config, pairs)
        out = _output("retrofit", output, False)
        result = run_retrofit(cfg, out, show_progress=not quiet)
    if "verdicts" not in result:  # a rank other than 0 under torchrun: rank 0 writes and prints
        return
    for v in result["verdicts"]:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}: {v['ours']}")
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'retrofit.json'}")


@command("loop-sweep")
def loop_sweep(
    model: Path = typer.Option(
        ...,
        "--model",
        help="A save_pretrained folder of a (loopified) causal LM, or a paradigm folder of an algorithmic run.",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="A .txt file (the model folder's tokenizer) or .jsonl of input_ids (and labels)."
    ),
    loops: str = typer.Option("1-16", "--loops", help="Loop counts, e.g. 1-16 or 1,2,4,8."),
    thresholds: str = typer.Option("", "--thresholds", help="Exit thresholds to histogram, e.g. 1e-4,1e-3."),
    exit_: str = typer.Option(
        "state",
        "--exit",
        help="Exit criterion for --thresholds: state, kl or entropy (kl, entropy: a range ending at the last layer).",
    ),
    exit_loops: int | None = typer.Option(
        None, "--exit-loops", help="Most loops a token runs with --thresholds (default: the model's n_loops)."
    ),
    layers: str | None = typer.Option(None, "--layers", help="START,STOP: loop a plain model's layers first."),
    context: int = typer.Option(128, "--context", help="Tokens per window."),
    max_windows: int = typer.Option(
        64, "--max-windows", help="Most windows read (labelled rows: 32 x this); the report says how many of how many."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder (default runs/loop-sweep-<time>)."),
) -> None:
    """Read a looped model at every loop count: perplexity, accuracy, FLOPs per token, the logit lens per
    loop, state convergence, exit histograms and an overthinking flag (needs the \\[hf] extra)."""
    from loopscape.experiments.loop_sweep import run_loop_sweep

    try:
        counts = parse_seeds(loops)
    except ConfigError:
        raise ConfigError(f"--loops must be comma-separated integers or ranges like 1-16 (got {loops!r})") from None
    try:
        limits = [float(t) for t in thresholds.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(
            f"--thresholds must be comma-separated numbers, e.g. 1e-4,1e-3 (got {thresholds!r})"
        ) from None
    try:
        pair = tuple(int(x) for x in layers.split(",")) if layers else None
    except ValueError:
        pair = ()
    if pair is not None and len(pair) != 2:
        raise ConfigError(f"--layers must be START,STOP (got {layers!r})")
    out = _output("loop-sweep", output, False)
    if exit_loops is not None and exit_loops < 1:
        raise ConfigError(f"--exit-loops must be an integer >= 1 (got {exit_loops})")
    if max_windows < 1:
        raise ConfigError(f"--max-windows must be an integer >= 1 (got {max_windows})")
    result = run_loop_sweep(model, data, counts, out, limits, exit_, pair, context, max_windows, exit_loops)
    for r in result["counts"]:
        exact = f"  exact match {r['exact_match']:.4f}" if "exact_match" in r else ""
        typer.echo(f"{r['n_loops']:>3} loops  perplexity {r['perplexity']:.3f}  accuracy {r['accuracy']:.4f}{exact}")
    if "windows_read" in result:
        typer.echo(f"read {result['windows_read']} of the data's {result['windows_total']} windows (--max-windows)")
    for e in result["exits"]:
        exact = f"  exact match {e['exact_match']:.4f}" if "exact_match" in e else ""
        typer.echo(
            f"exit {e['exit']} < {e['threshold']:g}: mean loops {e['mean_loops']:.2f}  "
            f"perplexity {e['perplexity']:.3f}  accuracy {e['accuracy']:.4f}{exact}"
        )
    flag = "flagged" if result["overthinking"] else "not flagged"
    typer.echo(f"Best at {result['best_n_loops']} loops; overthinking {flag}.")
    if "per_length" in result:  # a looped GPT: each length has its own T(n)
        n = len(result["per_length"])
        typer.echo(
            f"Per length: exact match highest at T(n) for {len(result['best_at_T'])} of {n} lengths; "
            f"overthinking flagged for {len(result['overthinking_lengths'])} of {n}."
        )
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'sweep.json'}")


@command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness's command line with the `loopscape` model type registered (the \\[eval] extra), e.g.
    loopscape lm-eval --model loopscape --model_args pretrained=DIR,n_loops=8 --tasks hellaswag"""
    from loopscape.integrations import lmeval

    sys.argv = ["loopscape lm-eval", *ctx.args]
    lmeval.main()


@command()
def sweep(
    output: Path | None = typer.Option(None, "--output", "-o", help="Sweep folder (default runs/sweep-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = SeedsOpt,
    epochs: int | None = EpochsOpt,
    set_: list[str] | None = SetOpt,
    grid: Path | None = typer.Option(
        None, "--grid", help="YAML file mapping setting -> list of values (default: configs/sweep-grid.yaml)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue --output: finish missing cells, re-summarise finished ones."
    ),
    quiet: bool = QuietOpt,
) -> None:
    """Sweep the settings the paper leaves open (embedding, width, batch size, init scale) and report
    which reproduce Observation 1."""
    from loopscape.experiments.markov import MarkovStudyConfig
    from loopscape.experiments.sweep import load_grid, run_sweep

    # the sweep's preset (configs/sweep.yaml: three seeds, no Hessian tracking), then the file, then flags
    files = [preset_file("sweep.yaml")] + ([config] if config else [])
    pairs = overrides(set_, ("--seeds", "seeds", seeds), ("--epochs", "train.epochs", epochs))
    base = load_config(MarkovStudyConfig, files, pairs)
    table = run_sweep(
        base,
        load_grid(grid or preset_file("sweep-grid.yaml")),
        _output("sweep", output, resume),
        resume=resume,
        show_progress=not quiet,
    )
    typer.echo(table)


@command()
def theory(
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default runs/theory-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = typer.Option(None, "--seeds", help="Seeds of the Theorem 3 alignment runs, e.g. 0,1,2."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of Single-Attn's trajectory for Theorem 3."),
    set_: list[str] | None = SetOpt,
    report: Path | None = typer.Option(
        None,
        "--report",
        help="A `loopscape markov` run folder: write into RUN/theory and add a Theory section to its summary.md.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Run the theory: Theorems 1-2 on random River-Valley instances, Corollaries 1-2, Theorem 3 on the toy models."""
    from loopscape.experiments.theory import TheoryStudyConfig, add_to_markov_summary, run_theory
    from loopscape.io import claim_new_run_folder

    pairs = overrides(set_, ("--seeds", "alignment_seeds", seeds), ("--epochs", "alignment_epochs", epochs))
    cfg = load_config(TheoryStudyConfig, config, pairs)
    if report is not None and not (report / "summary.md").exists():
        raise ConfigError(f"--report must name a `loopscape markov` run folder with summary.md (got {str(report)!r})")
    out = report / "theory" if report is not None else _output("theory", output, False)
    claim_new_run_folder(out, resumable=False)
    study = run_theory(cfg, out, show_progress=not quiet)
    if report is not None:
        add_to_markov_summary(report, study, cfg)
    typer.echo(f"Report: {out / 'theory.md'}  Figures: {out / 'figures'}")


@command()
def algorithmic(
    ctx: typer.Context,
    task: str = typer.Option(
        "parity", "--task", "-t", help="parity, copy, addition, binary_sum, unique_set or multiplication."
    ),
    paradigm: str = typer.Option(
        "single,looped,shift",
        "--paradigm",
        "-p",
        help="Comma-separated: single, looped, shift (SHIFT's saving needs looped too).",
    ),
    preset: str = typer.Option(
        "cpu-small",
        "--preset",
        help="cpu-small (minutes on 2 CPU cores), paper (Appendix E.2 on a GPU, the seed paper's 50,001 steps) or "
        "authors (paper, for the 100,001 steps of Fan et al.'s configs).",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output folder (default runs/algorithmic-<task>-<time>)."
    ),
    config: Path | None = ConfigOpt,
    seed: int | None = typer.Option(None, "--seed", help="Seed of the models and the data."),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds, e.g. 0,1,2: one run each (in <output>/seed-<k>) and a report over seeds.",
    ),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (overrides `train.steps`)."),
    set_: list[str] | None = SetOpt,
    resume: bool = ResumeOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Appendix E.2: Single-Attn, Looped-Attn and SHIFT on an algorithmic task (Figures 11, 14).
    Data-parallel under torchrun."""
    from loopscape.experiments.algorithmic import (
        AlgorithmicStudyConfig,
        preset_files,
        run_algorithmic,
        run_algorithmic_seeds,
    )

    # the preset, then the config file, then --paradigm's default, then --set, then the flags given
    # (ParameterSource by name: typer >= 0.29 has its own click, older ones click's)
    given = {p for p in ("task", "paradigm") if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"}
    files = preset_files(preset, task) + ([config] if config else [])
    pairs = {} if "paradigm" in given else {"paradigms": PARSE["--paradigm"](paradigm)}
    pairs.update(
        overrides(
            set_,
            ("--task", "task", task if "task" in given else None),
            ("--paradigm", "paradigms", paradigm if "paradigm" in given else None),
            ("--seed", "seed", seed),
            ("--steps", "train.steps", steps),
        )
    )
    cfg = load_config(AlgorithmicStudyConfig, files, pairs)
    out = _output(f"algorithmic-{task}", output, resume)
    if seeds is not None:
        if seed is not None:
            raise ConfigError("give --seed or --seeds, not both")
        if "seed" in pairs:
            raise ConfigError("give --set seed or --seeds, not both")
        summary = run_algorithmic_seeds(cfg, parse_seeds(seeds), out, resume=resume, show_progress=not quiet)
    else:
        results = run_algorithmic(cfg, out, resume=resume, show_progress=not quiet)
    if seeds is not None:
        from loopscape.reporting.algorithmic import seeds_markdown, seeds_verdicts

        typer.echo(seeds_markdown(summary))
        for v in seeds_verdicts(summary):
            typer.echo(f"{v['verdict']}: {v['claim']}: {v['ours']}")
        typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'seeds.json'}")
        return
    if not results:  # a non-zero rank under torchrun
        return
    from loopscape.reporting.algorithmic import NAMES, beyond

    for p, e in results["paradigms"].items():
        past = beyond(results, p)
        past_text = f"{past:5.1f}%" if past == past else "  n/a (no test length beyond it)"
        typer.echo(
            f"{NAMES[p]:>12}: val acc {100 * e['final']['val_acc']:5.1f}%   past the training length {past_text}"
        )
    if results.get("shift_saving"):
        s = results["shift_saving"]
        if s["shift_step"] is None:
            typer.echo("SHIFT never switched (SCP did not fire): it trained Single-Attn throughout")
        else:
            typer.echo(
                f"SHIFT switched at step {s['shift_step']}: {s['time_ratio']:.2f}x faster than Looped-Attn in wall "
                f"time, {s['flops_ratio']:.2f}x in FLOPs"
            )
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'results.json'}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
