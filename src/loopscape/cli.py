"""Command-line interface: ``loopscape reproduce``, ``markov``, ``sweep``, ``theory``, ``algorithmic``.

Each command imports its study when it runs, not at module top: the studies
bring torch and matplotlib, which ``loopscape --help`` should not wait for
(docs/architecture.md has the measurement).

Every run command takes ``--output DIR``, ``--seeds``, ``--epochs``, a config
file (YAML or TOML) and ``--set key.sub=value`` overrides. Bad settings stop
with one line naming the field and what is allowed (exit code 2).
"""

from __future__ import annotations

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


def overrides(sets: list[str] | None, **flags) -> dict:
    """``--set`` pairs, then each flag given (``{"train.epochs": 40}``); seeds come as text."""
    pairs = dict(parse_override(s) for s in sets or [])
    for key, value in flags.items():
        if value is not None:
            pairs[key] = parse_seeds(value) if key.split(".")[-1].endswith("seeds") else value
    return pairs


# what a command reports in one line instead of a traceback
FAILURES = (ConfigError, DivergenceError, OSError, MemoryError, BrokenProcessPool, ImportError)


def _fail(err: Exception) -> None:
    """One line on standard error; exit 2 for bad settings, 1 for a run that failed."""
    if isinstance(err, BrokenProcessPool):
        text = "a worker process died (killed by the system: out of memory?); lower the sizes or `workers`"
    elif isinstance(err, MemoryError):
        text = "out of memory; lower the sizes (data sets, batch size, width) or `workers`"
    elif isinstance(err, OSError) and not isinstance(err, ConfigError):
        where = f" {err.filename}" if err.filename else ""
        text = f"cannot read or write{where}: {err.strerror or err}"
    else:
        text = str(err)
    typer.secho(f"error: {text}", fg="red", err=True)
    raise typer.Exit(2 if isinstance(err, ConfigError) else 1)


def _output(kind: str, output: Path | None, resume: bool) -> Path:
    """The run folder: ``--output``, or ``runs/<kind>-<time>`` (``--resume`` needs ``--output``)."""
    if resume and output is None:
        raise ConfigError("--resume needs --output naming the run folder to continue")
    return output or Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
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

    try:
        files = [preset_file("reproduce-quick.yaml")] if quick else []
        cfg = load_config(
            ReproduceConfig, files + ([config] if config else []), overrides(set_, **{"markov.seeds": seeds})
        )
        out = _output("reproduce", output, resume)
        if languages is not None:
            result = run_over_languages(cfg, out, languages, resume=resume, show_progress=not quiet)
            typer.echo(result["markdown"])
            typer.echo(f"Verdicts over languages: {out / 'languages.md'}")
            return
        report = run_reproduce(cfg, out, resume=resume, show_progress=not quiet)
    except FAILURES as err:
        _fail(err)
    for v in report["verdicts"]:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}")
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'report.json'}")


@app.command()
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

    try:
        cfg = load_config(MarkovStudyConfig, config, overrides(set_, seeds=seeds, **{"train.epochs": epochs}))
        out = _output("markov", output, resume)
        study = run_markov_study(cfg, out, resume=resume, show_progress=not quiet)
    except FAILURES as err:
        _fail(err)
    for v in study.verdicts:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}: {v['ours']}")
    typer.echo(f"Report: {out / 'summary.md'}  Figures: {out / 'figures'}")


@app.command()
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

    try:
        cfg = load_config(LanguagesConfig, config, overrides(set_, seeds=seeds))
        out = _output("languages", output, False)
        result = run_languages(cfg, out, show_progress=not quiet)
    except FAILURES as err:
        _fail(err)
    typer.echo(result["markdown"])
    typer.echo(f"Table: {out / 'languages.md'}  Numbers: {out / 'languages.json'}")


@app.command("length-readings")
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

    try:
        cfg = load_config(MarkovStudyConfig, config, overrides(set_, seeds=seeds, **{"train.epochs": epochs}))
        out = _output("length-readings", output, resume)
        study = run_length_readings(cfg, out, resume=resume, show_progress=not quiet)
    except FAILURES as err:
        _fail(err)
    for row in study.results["readings"]:
        typer.echo(
            f"{row['verdict']['verdict']:>18}  attention {row['attention']}, positions {row['positions']}, "
            f"test targets {row['test_targets']}{' (default)' if row['default'] else ''}"
        )
    typer.echo(f"Table: {out / 'length_readings.md'}")


@app.command()
def retrofit(
    output: Path | None = typer.Option(None, "--output", "-o", help="Run folder (default runs/retrofit-<time>)."),
    config: Path | None = ConfigOpt,
    seeds: str | None = SeedsOpt,
    model: Path | None = typer.Option(None, "--model", help="A local checkpoint (save_pretrained folder) as Stage I."),
    data: Path | None = typer.Option(None, "--data", help="A local UTF-8 text file to train on instead of the task."),
    set_: list[str] | None = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Appendix B: loop the middle layers of a trained decoder and continue, against continuing it plain
    and a looped model from scratch (needs the \\[hf] extra)."""
    from loopscape.experiments.retrofit import RetrofitConfig, run_retrofit

    try:
        flags = {"model_path": str(model) if model else None, "data_path": str(data) if data else None}
        cfg = load_config(RetrofitConfig, config, overrides(set_, seeds=seeds, **flags))
        out = _output("retrofit", output, False)
        result = run_retrofit(cfg, out, show_progress=not quiet)
    except FAILURES as err:
        _fail(err)
    for v in result["verdicts"]:
        typer.echo(f"{v['verdict']:>18}  {v['claim']}: {v['ours']}")
    typer.echo(f"Report: {out / 'report.html'}  Numbers: {out / 'retrofit.json'}")


@app.command("loop-sweep")
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
    exit_: str = typer.Option("kl", "--exit", help="Exit criterion for --thresholds: kl, entropy or state."),
    exit_loops: int | None = typer.Option(
        None, "--exit-loops", help="Most loops a token runs with --thresholds (default: the model's n_loops)."
    ),
    layers: str | None = typer.Option(None, "--layers", help="START,STOP: loop a plain model's layers first."),
    context: int = typer.Option(128, "--context", help="Tokens per window."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder (default runs/loop-sweep-<time>)."),
) -> None:
    """Read a looped model at every loop count: perplexity, accuracy, FLOPs per token, the logit lens per
    loop, state convergence, exit histograms and an overthinking flag (needs the \\[hf] extra)."""
    from loopscape.experiments.loop_sweep import run_loop_sweep

    try:
        try:
            counts = parse_seeds(loops)
        except ConfigError:
            raise ConfigError(f"--loops must be comma-separated integers or ranges like 1-16 (got {loops!r})") from None
        limits = [float(t) for t in thresholds.split(",") if t.strip()]
        pair = tuple(int(x) for x in layers.split(",")) if layers else None
        if pair is not None and len(pair) != 2:
            raise ConfigError(f"--layers must be START,STOP (got {layers!r})")
        out = _output("loop-sweep", output, False)
        if exit_loops is not None and exit_loops < 1:
            raise ConfigError(f"--exit-loops must be an integer >= 1 (got {exit_loops})")
        result = run_loop_sweep(model, data, counts, out, limits, exit_, pair, context, exit_loops=exit_loops)
    except ValueError as err:
        _fail(err if isinstance(err, ConfigError) else ConfigError(str(err)))
    except FAILURES as err:
        _fail(err)
    for r in result["counts"]:
        exact = f"  exact match {r['exact_match']:.4f}" if "exact_match" in r else ""
        typer.echo(f"{r['n_loops']:>3} loops  perplexity {r['perplexity']:.3f}  accuracy {r['accuracy']:.4f}{exact}")
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


@app.command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness's command line with the `loopscape` model type registered (the \\[eval] extra), e.g.
    loopscape lm-eval --model loopscape --model_args pretrained=DIR,n_loops=8 --tasks hellaswag"""
    try:
        from loopscape.integrations import lmeval
    except ImportError as err:
        _fail(err)
    sys.argv = ["loopscape lm-eval", *ctx.args]
    lmeval.main()


@app.command()
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

    try:
        # the sweep's preset (configs/sweep.yaml: three seeds, no Hessian tracking), then the file, then flags
        files = [preset_file("sweep.yaml")] + ([config] if config else [])
        base = load_config(MarkovStudyConfig, files, overrides(set_, seeds=seeds, **{"train.epochs": epochs}))
        table = run_sweep(
            base,
            load_grid(grid or preset_file("sweep-grid.yaml")),
            _output("sweep", output, resume),
            resume=resume,
            show_progress=not quiet,
        )
    except FAILURES as err:
        _fail(err)
    typer.echo(table)


@app.command()
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

    try:
        cfg = load_config(TheoryStudyConfig, config, overrides(set_, alignment_seeds=seeds, alignment_epochs=epochs))
        if report is not None and not (report / "summary.md").exists():
            raise ConfigError(
                f"--report must name a `loopscape markov` run folder with summary.md (got {str(report)!r})"
            )
        out = report / "theory" if report is not None else _output("theory", output, False)
        claim_new_run_folder(out, resumable=False)
        study = run_theory(cfg, out, show_progress=not quiet)
        if report is not None:
            add_to_markov_summary(report, study, cfg)
    except FAILURES as err:
        _fail(err)
    typer.echo(f"Report: {out / 'theory.md'}  Figures: {out / 'figures'}")


@app.command()
def algorithmic(
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

    try:
        # the preset, then the config file, then the flags and --set
        files = preset_files(preset, task) + ([config] if config else [])
        pairs = {"paradigms": [p.strip() for p in paradigm.split(",") if p.strip()]}
        pairs.update(overrides(set_, seed=seed, **{"train.steps": steps}))
        cfg = load_config(AlgorithmicStudyConfig, files, pairs)
        out = _output(f"algorithmic-{task}", output, resume)
        if seeds is not None:
            if seed is not None:
                raise ConfigError("give --seed or --seeds, not both")
            summary = run_algorithmic_seeds(cfg, parse_seeds(seeds), out, resume=resume, show_progress=not quiet)
        else:
            results = run_algorithmic(cfg, out, resume=resume, show_progress=not quiet)
    except (*FAILURES, ValueError) as err:
        _fail(err)
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
