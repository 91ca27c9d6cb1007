"""`loopscape retrofit`: Appendix B on a small Hugging Face decoder.

Appendix B proposes to "begin with a well-trained standard, non-recursive model
... introduce recursion into some of its blocks and continue to train". Here:

* **Stage I** trains a small Llama-layout decoder (RoPE positions) on one of
  the algorithmic tasks (rows as token sequences, the task's length
  curriculum, loss on the answer positions), or starts from a local
  checkpoint (``model_path``).
* Then three **arms** with the same further budget of ``stage2_steps`` steps:
  ``plain`` continues the model as it is; ``shift`` loopifies the middle
  layers (:func:`loopscape.loopify`) and continues (SHIFT from a trained
  model); ``scratch`` trains the looped model from its initialisation for the
  whole budget, ``stage1_steps + stage2_steps``.

``arms`` adds the recurrent-depth literature's ways to train the looped
continuation, each SHIFT from the same trained model (:data:`VARIANTS`): a
Poisson-log-normal depth per step (Huginn), truncated backprop through the
last 1 or 2 loops, a learned concat injection, and a per-loop LoRA (Relaxed
Recursive Transformers).

Each arm is scored by exact match at every test length: within the training
lengths and past them. Compute is counted in FLOPs and wall time (see
:func:`step_flops`). The verdict rule is stated in :func:`verdicts`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from loopscape.config import ConfigError, require, require_fits, require_seeds, to_dict
from loopscape.data.algorithmic import TASKS, AlgorithmicTask, Curriculum
from loopscape.extras import require_extra
from loopscape.io import atomic_write_text, prepare_run_folder, write_json
from loopscape.looped import loop_settings, set_n_loops, weights_inside
from loopscape.looped.decoder import looped_layers, loopify
from loopscape.models.looped_gpt import exact_match
from loopscape.reporting.hessian import (
    COUPLING_SEEDS_RULE,
    COUPLING_SHAPES_RULE,
    coupling_over_seeds,
    coupling_seeds_row,
    coupling_seeds_table,
)
from loopscape.reporting.html import Section, render_report, versions
from loopscape.reporting.retrofit import markdown, verdicts
from loopscape.shift.controller import ShiftController
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.run import check_finite

ARMS = ("plain", "shift", "scratch")
# SHIFT from the trained model, trained as the recurrent-depth literature does: loopify's options per arm
VARIANTS = {
    "shift-plnorm": {},  # a Poisson-log-normal depth per step, mean n_loops, at most 2 n_loops; tested at n_loops
    "shift-k1": {"backprop_loops": 1},
    "shift-k2": {"backprop_loops": 2},
    "shift-concat": {"injection": "concat"},
    "shift-lora": {"loop_lora": None},  # the rank is the config's lora_rank
}


@dataclass
class RetrofitConfig:
    """The study's settings; the defaults run in minutes on 2 CPU cores."""

    task: str = "parity"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    loop_layers: list[int] = field(default_factory=lambda: [1, 3])  # the middle range, looped
    n_loops: int = 3
    injection: str = "add"
    stage1_steps: int = 600
    stage2_steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    train_max_len: int = 8
    curriculum_interval: int = 40
    test_lengths: list[int] = field(default_factory=lambda: list(range(1, 13)))
    test_size: int = 128
    eval_every: int = 100  # steps between accuracy readings of the shift and scratch arms (compute to reach)
    model_path: str | None = None  # a local checkpoint (save_pretrained folder) instead of Stage I
    data_path: str | None = None  # a local UTF-8 text file instead of the task (characters as tokens)
    text_context: int = 64  # with data_path: training windows; tested at this length and at twice it
    arms: list[str] = field(default_factory=lambda: list(ARMS))  # plain, shift, scratch and any of VARIANTS
    lora_rank: int = 4  # the shift-lora arm's per-loop rank
    clip: float | None = 1.0  # the gradient-norm clip of every step (null: none)
    # the loss Hessian over these looped weights split by loop pairs, on the shift and scratch arms' final models
    # (exact: about P products of each kind; None: not measured)
    loop_coupling_params: str | None = None

    def validate(self, p: str = "") -> None:
        require(self.task in TASKS, f"{p}task", f"one of {TASKS}", self.task)
        require_seeds(self.seeds, f"{p}seeds")
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "stage1_steps",
            "stage2_steps",
            "batch_size",
            "test_size",
            "eval_every",
        ):
            require(getattr(self, name) >= 1, f"{p}{name}", "an integer >= 1", getattr(self, name))
        require(self.d_model % self.n_heads == 0, f"{p}n_heads", f"a divisor of d_model ({self.d_model})", self.n_heads)
        a, b = (self.loop_layers + [0, 0])[:2]
        require(
            len(self.loop_layers) == 2 and 0 <= a < b <= self.n_layers,
            f"{p}loop_layers",
            f"[start, stop] with 0 <= start < stop <= n_layers ({self.n_layers})",
            self.loop_layers,
        )
        require(self.n_loops >= 2, f"{p}n_loops", "an integer >= 2", self.n_loops)
        require(
            set(ARMS) <= set(self.arms) <= set(ARMS) | set(VARIANTS) and len(set(self.arms)) == len(self.arms),
            f"{p}arms",
            f"plain, shift and scratch, and any of {sorted(VARIANTS)}, each once",
            self.arms,
        )
        require(self.lora_rank >= 1, f"{p}lora_rank", "an integer >= 1", self.lora_rank)
        require(self.clip is None or self.clip > 0, f"{p}clip", "null (no clip) or a number > 0", self.clip)
        require(self.text_context >= 2, f"{p}text_context", "an integer >= 2", self.text_context)
        require(
            self.data_path is None or Path(self.data_path).is_file(),
            f"{p}data_path",
            "null or a readable text file",
            self.data_path,
        )
        require(
            self.loop_coupling_params is None or self.data_path is None,
            f"{p}loop_coupling_params",
            "null with data_path (the split is measured on the task's rows)",
            self.loop_coupling_params,
        )
        require(self.lr > 0, f"{p}lr", "a number > 0", self.lr)
        require(self.train_max_len >= 1, f"{p}train_max_len", "an integer >= 1", self.train_max_len)
        require(self.curriculum_interval >= 1, f"{p}curriculum_interval", "an integer >= 1", self.curriculum_interval)
        require(
            bool(self.test_lengths) and min(self.test_lengths) >= 1,
            f"{p}test_lengths",
            "a non-empty list of integers >= 1",
            self.test_lengths,
        )
        require(
            max(self.test_lengths) > self.train_max_len,
            f"{p}test_lengths",
            f"lengths that include some past train_max_len ({self.train_max_len})",
            self.test_lengths,
        )


class TaskData:
    """An algorithmic task as token rows, with its length curriculum; scored by exact match of the
    answer at every test length."""

    metric = "exact match of the answer"

    def __init__(self, cfg: RetrofitConfig):
        self.cfg, self.task = cfg, AlgorithmicTask(cfg.task)
        self.curriculum = Curriculum(cfg.train_max_len, cfg.curriculum_interval)
        self.vocab_size, self.pad = self.task.vocab_size, self.task.pad
        self.max_width = self.task.width(max(cfg.test_lengths))
        self.train_length = cfg.train_max_len

    def batch(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.task.batch(self.curriculum.lengths(step, self.cfg.batch_size, generator), generator)
        return b.inputs, b.targets, b.mask

    def per_length(self, model: torch.nn.Module, seed: int) -> dict[int, float]:
        out = {}
        for n in self.cfg.test_lengths:
            b = self.task.test_batch(n, self.cfg.test_size, torch.Generator().manual_seed(seed * 1000 + n))
            pred = model(input_ids=b.inputs, use_cache=False).logits.argmax(-1)
            out[n] = 100 * exact_match(pred, b.targets, b.mask).float().mean().item()
        return out

    def sweep_rows(self, seed: int) -> list[dict]:
        """The test rows of :meth:`per_length` for ``loopscape loop-sweep``: the answers as Hugging Face
        ``labels`` (shifted by the model, so the row gets one pad token more, whose own output is not read)."""
        rows = []
        for n in self.cfg.test_lengths:
            inputs, labels = self.labelled(n, self.cfg.test_size, seed * 1000 + n)
            rows += [{"input_ids": x, "labels": y} for x, y in zip(inputs.tolist(), labels.tolist())]
        return rows

    def labelled(self, n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` test rows of length ``n`` with their answers as Hugging Face ``labels`` (:meth:`sweep_rows`)."""
        b = self.task.test_batch(n, size, torch.Generator().manual_seed(seed))
        pad = torch.full_like(b.inputs[:, :1], self.pad)
        labels = torch.cat([torch.full_like(pad, -100), torch.where(b.mask, b.targets, -100)], 1)
        return torch.cat([b.inputs, pad], 1), labels

    def coupling_batches(self, seed: int, rows: int = 8) -> list[dict]:
        """``rows`` rows of the longest training length, fixed by the seed, as one batch: the data
        :func:`loop_coupling` reads (one batch, so each product is one forward)."""
        inputs, labels = self.labelled(self.cfg.train_max_len, rows, seed * 1000 + 500)
        return [{"input_ids": inputs, "labels": labels}]


class TextData:
    """A local text file, character by character: the first 90% trains on windows of
    ``text_context`` characters, the rest tests. Scored by next-character accuracy on held-out
    windows of ``text_context`` characters (within) and on the positions past ``text_context`` of
    windows twice as long (past)."""

    metric = "next-character accuracy"

    def __init__(self, cfg: RetrofitConfig):
        text = Path(cfg.data_path).read_text(encoding="utf-8")
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text])
        cut, need = int(0.9 * len(ids)), 2 * cfg.text_context + 1
        if cut <= need or len(ids) - cut <= need:
            raise ConfigError(
                f"data_path must hold at least {10 * need} characters for windows of text_context "
                f"{cfg.text_context} (got {len(ids)})"
            )
        self.cfg, self.train_ids, self.test_ids = cfg, ids[:cut], ids[cut:]
        self.vocab_size, self.pad = len(chars), 0
        self.max_width = 2 * cfg.text_context
        self.train_length = cfg.text_context

    def _windows(self, ids: torch.Tensor, width: int, size: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - width - 1, (size,), generator=generator)
        return ids[starts[:, None] + torch.arange(width + 1)]

    def batch(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self._windows(self.train_ids, self.cfg.text_context, self.cfg.batch_size, generator)
        return w[:, :-1], w[:, 1:], torch.ones_like(w[:, 1:], dtype=torch.bool)

    def per_length(self, model: torch.nn.Module, seed: int) -> dict[int, float]:
        out, n = {}, self.cfg.text_context
        for width, first in ((n, 0), (2 * n, n)):  # past: only the positions beyond the training context
            w = self._windows(self.test_ids, width, self.cfg.test_size, torch.Generator().manual_seed(seed + width))
            pred = model(input_ids=w[:, :-1], use_cache=False).logits.argmax(-1)
            out[width] = 100 * (pred[:, first:] == w[:, 1 + first :]).float().mean().item()
        return out

    def sweep_rows(self, seed: int) -> list[dict]:
        """Held-out windows of twice the training context for ``loopscape loop-sweep``."""
        width = 2 * self.cfg.text_context
        w = self._windows(self.test_ids, width, self.cfg.test_size, torch.Generator().manual_seed(seed + width))
        return [{"input_ids": row} for row in w.tolist()]


def build_metric(cfg: RetrofitConfig) -> str:
    return (TextData if cfg.data_path is not None else TaskData).metric


def build_data(cfg: RetrofitConfig) -> TaskData | TextData:
    return TextData(cfg) if cfg.data_path is not None else TaskData(cfg)


def build_decoder(cfg: RetrofitConfig, data: TaskData | TextData, seed: int) -> torch.nn.Module:
    """A small Llama-layout causal LM over the data's tokens (or the local checkpoint)."""
    transformers = require_extra("transformers", "hf")
    if cfg.model_path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(cfg.model_path)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=data.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=data.max_width + 8,
        bos_token_id=data.pad,
        eos_token_id=data.pad,
        pad_token_id=data.pad,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def step_flops(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Training FLOPs of one step: 2 x tokens x the weights a token's forward passes through, plus 4 x tokens x
    those its backward does (attention's score products left out, small at these widths). The looped range
    counts as its ``weights_per_token`` says (:class:`~loopscape.looped.Looped`): its layers once per
    loop, a concat adapter and per-loop LoRA as used, and a truncated backward through the last
    ``backprop_loops`` loops only."""
    looped = looped_layers(model)
    params = sum(p.numel() for p in model.parameters())
    if looped is None:
        return 6.0 * inputs.numel() * params
    inside = weights_inside(looped)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    n = looped.n_loops
    forward = outside + looped.weights_per_token(n)
    backward = outside + looped.weights_per_token(n, looped.backprop_loops)
    return inputs.numel() * (2.0 * forward + 4.0 * backward)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TaskData | TextData,
    steps: range,
    generator: torch.Generator,
    cfg: RetrofitConfig,
    readings: list | None = None,
    flops_before: float = 0.0,
    seed: int = 0,
    depth: ShiftSchedule | None = None,
) -> dict:
    """Train for ``steps`` (curriculum step numbers); returns the FLOPs and wall time spent. With
    ``readings``, every ``eval_every`` steps appends ``(FLOPs so far + flops_before, accuracy past the
    training length)`` (evaluation time is not counted)."""
    flops, t0, evaluating = 0.0, time.perf_counter(), 0.0
    shift = ShiftController(depth, model) if depth is not None else None  # a sampled depth per step
    model.train()
    for step in steps:
        if shift is not None:
            shift.before_step(step - steps[0] + 1)
        inputs, targets, mask = data.batch(step, generator)
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if cfg.clip is None else cfg.clip)
        check_finite({"loss": loss.item(), "grad_norm": norm.item()}, f"retrofit step {step}", "lr (or clip) too large")
        optimizer.step()
        flops += step_flops(model, inputs)
        if readings is not None and (step % cfg.eval_every == 0 or step == steps[-1]):
            t1 = time.perf_counter()
            with loop_settings(model, n_loops=cfg.n_loops) if shift is not None else contextlib.nullcontext():
                readings.append((flops_before + flops, accuracy(model, data, seed)["past"]))
            model.train()
            evaluating += time.perf_counter() - t1
    return {"flops": flops, "time_s": time.perf_counter() - t0 - evaluating}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TaskData | TextData, seed: int) -> dict:
    """Accuracy per test length, and its mean within and past the training length."""
    model.eval()
    per_length = data.per_length(model, seed)
    within = [a for n, a in per_length.items() if n <= data.train_length]
    past = [a for n, a in per_length.items() if n > data.train_length]
    return {
        "per_length": per_length,
        "within": sum(within) / len(within) if within else None,
        "past": sum(past) / len(past) if past else None,
    }


def final_coupling(model: torch.nn.Module, data: TaskData, cfg: RetrofitConfig, seed: int) -> dict:
    """The loss Hessian over ``cfg.loop_coupling_params`` split by loop pairs (:mod:`loopscape.landscape.loops`),
    exact, on 8 fixed rows of the longest training length: the shapes of the tied Hessian against its diagonal
    blocks (:func:`~loopscape.landscape.loops.loop_coupling`)."""
    from loopscape.landscape.loops import loop_coupling, loop_hessian

    training = model.training
    model.eval()
    try:
        return loop_coupling(loop_hessian(model, data.coupling_batches(seed), params=cfg.loop_coupling_params))
    finally:
        model.train(training)


def check_coupling_params(cfg: RetrofitConfig, data: TaskData | TextData) -> None:
    """``loop_coupling_params`` must select looped weights of the loopified model: refused in one line before
    any training (a bad pattern found after it would lose the run)."""
    from loopscape.landscape.hessian import select_parameters
    from loopscape.landscape.loops import looped_parameter_names

    model = loopify(build_decoder(cfg, data, 0), layers=tuple(cfg.loop_layers), n_loops=cfg.n_loops)
    looped = looped_parameter_names(model)
    try:
        chosen = select_parameters(model, cfg.loop_coupling_params)
    except ValueError:
        chosen = []
    require(
        bool(chosen) and set(chosen) <= set(looped),
        "loop_coupling_params",
        f"a name pattern of looped weights only, e.g. {looped[0]!r}",
        cfg.loop_coupling_params,
    )
    named = dict(model.named_parameters())
    P = sum(named[n].numel() for n in chosen)
    # the split is exact: dense full and diagonal parts and their difference, float64, and eigh's copies
    require_fits(8 * 6 * P * P, "loop_coupling_params", cfg.loop_coupling_params, f"a dense {P:,} x {P:,} split")


def save_model(model: torch.nn.Module, folder: Path, state_dict: dict | None = None, tokenizer=None) -> None:
    """``save_pretrained`` into ``folder`` all at once: written beside it, then moved into place (``state_dict``:
    the weights to write, e.g. gathered from a sharded model; default the model's own; ``tokenizer``: saved
    with them, so the folder is all that ``loop-sweep`` and ``lm-eval`` need)."""
    from transformers.utils import logging as hf_logging

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per tiny model would bury the study's own lines
    try:
        model.save_pretrained(partial, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    partial.replace(folder)


def run_seed(cfg: RetrofitConfig, seed: int, models: Path | None = None) -> dict:
    """Stage I, then the three arms, for one seed; with ``models``, each arm's final model is saved in
    ``models/seed<seed>/<arm>`` (a loopified one keeps its loop settings: ``loopscape loop-sweep`` reads it)."""
    data = build_data(cfg)
    total = cfg.stage1_steps + cfg.stage2_steps
    generator = torch.Generator().manual_seed(seed)
    base = build_decoder(cfg, data, seed)
    optimizer = torch.optim.AdamW(base.parameters(), lr=cfg.lr)
    stage1 = {"flops": 0.0, "time_s": 0.0}
    if cfg.model_path is None:
        stage1 = train(base, optimizer, data, range(1, cfg.stage1_steps + 1), generator, cfg)
    out = {"stage1": {**stage1, **accuracy(base, data, seed)}}
    later = range(cfg.stage1_steps + 1, total + 1)
    for arm in [a for a in cfg.arms if a != "scratch"]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        opt.load_state_dict(optimizer.state_dict())  # continue training: the optimiser state goes on
        depth = None
        if arm != "plain":
            options = {"injection": cfg.injection, **VARIANTS.get(arm, {})}
            if "loop_lora" in options:
                options["loop_lora"] = cfg.lora_rank
            n = 2 * cfg.n_loops if arm == "shift-plnorm" else cfg.n_loops
            loopify(model, layers=tuple(cfg.loop_layers), n_loops=n, **options)
            looped = looped_layers(model)
            if looped.lora_parameters() or looped.adapter_parameters():  # new weights: a group of their own
                opt.add_param_group({"params": looped.lora_parameters() + looped.adapter_parameters()})
            if arm == "shift-plnorm":
                depth = ShiftSchedule(n, at=0, depth="poisson-lognormal", mean_depth=cfg.n_loops, seed=seed)
        gen = torch.Generator()
        gen.set_state(generator.get_state())  # the same data stream for every arm
        readings = []
        spent = train(model, opt, data, later, gen, cfg, readings, stage1["flops"], seed, depth)
        if depth is not None:
            set_n_loops(model, cfg.n_loops)  # scored, and saved, at the mean depth
        if models is not None:
            save_model(model, models / f"seed{seed}" / arm)
        out[arm] = {
            "flops": stage1["flops"] + spent["flops"],
            "time_s": stage1["time_s"] + spent["time_s"],
            "readings": readings,
            **accuracy(model, data, seed),
        }
        if arm == "shift" and cfg.loop_coupling_params is not None:
            out[arm]["loop_coupling"] = final_coupling(model, data, cfg, seed)
    scratch = loopify(
        build_decoder(cfg, data, seed), layers=tuple(cfg.loop_layers), n_loops=cfg.n_loops, injection=cfg.injection
    )
    readings = []
    spent = train(
        scratch,
        torch.optim.AdamW(scratch.parameters(), lr=cfg.lr),
        data,
        range(1, total + 1),
        torch.Generator().manual_seed(seed),
        cfg,
        readings,
        seed=seed,
    )
    if models is not None:
        save_model(scratch, models / f"seed{seed}" / "scratch")
    out["scratch"] = {**spent, "readings": readings, **accuracy(scratch, data, seed)}
    if cfg.loop_coupling_params is not None:
        out["scratch"]["loop_coupling"] = final_coupling(scratch, data, cfg, seed)
    target = out["scratch"]["past"]
    reached = next((f for f, acc in out["shift"]["readings"] if acc >= target), None)
    # compute SHIFT (Stage I included) spent until its accuracy past the training length first reached the
    # scratch arm's final one; None if it never did
    out["shift_flops_to_scratch_final"] = reached
    return out


def run_retrofit(cfg: RetrofitConfig, out: str | Path, show_progress: bool = True) -> dict:
    """Every seed; writes ``retrofit.json`` and ``report.html`` into ``out``, each arm's model into
    ``models/`` and the test rows into ``sweep-data.jsonl`` (for ``loopscape loop-sweep``); returns the
    content of ``retrofit.json``."""
    out = Path(out)
    data = build_data(cfg)  # a text file too short for its windows is refused before the run folder is made
    if cfg.loop_coupling_params is not None:
        check_coupling_params(cfg, data)
    prepare_run_folder(out, cfg, resume=False)
    atomic_write_text(out / "sweep-data.jsonl", "".join(json.dumps(r) + "\n" for r in data.sweep_rows(cfg.seeds[0])))
    runs = {}
    for seed in cfg.seeds:
        if show_progress:
            print(f"retrofit: seed {seed} ...", flush=True)
        runs[seed] = run_seed(cfg, seed, out / "models")
    rows = verdicts(runs)
    text = markdown(cfg, runs, rows, build_metric(cfg))
    coupling = {
        arm: coupling_over_seeds({seed: r[arm]["loop_coupling"] for seed, r in runs.items()})
        for arm in ("shift", "scratch")
        if cfg.loop_coupling_params is not None
    }
    if coupling:
        claim = "Retrofit: the V-valley comes from cross-loop coupling"
        rows = rows + [coupling_seeds_row(claim, arm, c) for arm, c in coupling.items()]
        text += "\n\n" + "\n".join(
            [
                f"## The Hessian split by loop pairs (over `{cfg.loop_coupling_params}`)",
                "",
                f"On the final shift and scratch models (layers {cfg.loop_layers[0]}..{cfg.loop_layers[1] - 1} "
                f"looped {cfg.n_loops} times), exact, on 8 fixed rows of length {cfg.train_max_len}: 'diagonal' = "
                "the sum of the H_tt (an untied, unrolled model), 'cross' = what tying the loops adds. Per seed: "
                f"{COUPLING_SHAPES_RULE}. Over seeds: {COUPLING_SEEDS_RULE}.",
                "",
                coupling_seeds_table(coupling),
            ]
        )
    result = {"config": to_dict(cfg), "runs": {str(s): r for s, r in runs.items()}, "verdicts": rows}
    if coupling:
        result["loop_coupling"] = coupling
    write_json(out / "retrofit.json", result)
    page = render_report(
        "loopscape: retrofit (Appendix B)",
        "Recursion introduced into a trained decoder, against continuing it plain and a looped model from scratch.",
        rows,
        [Section("retrofit", "Retrofit (Appendix B)", text)],
        yaml.safe_dump(to_dict(cfg), sort_keys=False),
        versions(),
    )
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "retrofit.md", text)
    return result
