"""`loopscape retrofit --model M --data T`: retrofitted recurrence on a pretrained causal LM and real text.

The recipe of retrofitted recurrence (McLeish et al., 2025, "Teaching pretrained language models to think
deeper with retrofitted recurrence"): take a trained decoder, loop its middle layers (a prelude, a
recurrent block, a coda) and continue training on text. Arms (:data:`ARMS`), each from the same pretrained
weights, on the same batches (drawn from the seed and the step alone), **at equal training FLOPs**: the
budget is ``budget_steps`` steps of the plain model, and every looped arm runs as many steps as fit in it,
counted by the loop protocol's ``weights_per_token`` (a truncated backward counts its last
``backprop_loops`` loops only, :func:`loopscape.experiments.retrofit.step_flops`):

* ``plain``: continue the model unlooped;
* ``shift``: SHIFT, one loop for the first ``switch_fraction`` of the budget, then a linear depth
  curriculum up to ``n_loops`` (:class:`~loopscape.shift.schedule.ShiftSchedule`, ``ramp="linear"``);
* ``loop``: ``n_loops`` loops from the first step;
* ``shift-lora``: ``shift`` with a per-loop LoRA of rank ``lora_rank``, back-propagating through every loop
  (a truncated backward would leave the LoRA of the early loops at B = 0);
* ``shift-concat``: ``shift`` with the learned concat injection.

Every arm is scored by held-out perplexity at each of ``test_loops`` (the last 10% of the text by
characters, never trained on), and, in the plain loop, at its current depth every ``eval_every`` steps
(perplexity against training FLOPs). The verdicts are stated in :mod:`loopscape.reporting.retrofit`
(:func:`~loopscape.reporting.retrofit.lm_verdicts`) before any run.

Each (seed, arm) is a unit of its own: its result is written once, atomically (``seed<s>/<arm>/result.json``),
and its training checkpoints every ``checkpoint_every`` steps, so a killed run resumes (``--resume``) inside
the arm it was in, to the same weights. ``trainer: hf`` trains each arm with the Hugging Face ``Trainer`` and
:class:`~loopscape.integrations.hf.ShiftCallback` instead (its own checkpoints, resumed by the Trainer).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from loopscape.config import ConfigError, require, require_seeds, to_dict
from loopscape.errors import DamagedRunError
from loopscape.experiments.retrofit import save_model, step_flops
from loopscape.io import atomic_write_text, prepare_run_folder, read_json_file, write_json
from loopscape.looped import loop_settings
from loopscape.looped.decoder import looped_layers, loopify
from loopscape.looped.io import gguf_file, load_gguf, load_tokenizer
from loopscape.looped.structure import Structure
from loopscape.reporting.html import Section, render_report, versions
from loopscape.reporting.retrofit import lm_figures, lm_markdown, lm_verdicts
from loopscape.shift.controller import ShiftController
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loopscape.training.distributed import (
    PARALLEL,
    data_parallel,
    init_distributed,
    load_gathered_checkpoint,
    on_rank0,
    rank_and_world,
    save_gathered_checkpoint,
)
from loopscape.training.run import check_finite, seeded

ARMS = ("plain", "shift", "loop", "shift-lora", "shift-concat")
PYDOC = "pydoc"  # data_path's name for CPython's pydoc topics (PSF licence), installed with Python itself
HELD_OUT = 0.1  # the last tenth of the text, by characters, is never trained on
TRAINERS = ("loop", "hf")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LMRetrofitConfig:
    """The study's settings. The defaults are the table in docs/integrations.md: SmolLM2-135M's layers 12..17
    looped, 5 arms x 3 seeds in about 75 minutes on one CPU core."""

    model_path: str = ""  # a GGUF file (or a folder holding one), or a save_pretrained folder of a plain causal LM
    data_path: str = PYDOC  # a UTF-8 text file, or "pydoc"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    loop_layers: list[int] = field(default_factory=lambda: [12, 18])  # the recurrent block; prelude and coda around it
    n_loops: int = 3  # the depth trained (and scored) in Stage II
    test_loops: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    budget_steps: int = 40  # the FLOPs budget of every arm: this many steps of the plain model
    switch_fraction: float = 0.5  # SHIFT's Stage I: this share of the budget at one loop
    batch_size: int = 8
    context: int = 64  # tokens per training and test window
    lr: float = 1e-4
    weight_decay: float = 0.01  # torch's AdamW default (the HF Trainer's AdamW leaves biases and norms out)
    clip: float | None = 1.0
    backprop_loops: int | None = 1  # truncated backprop through the last k loops (None: every loop)
    lora_rank: int = 8
    eval_windows: int = 16  # held-out windows of `context` tokens
    eval_every: int = 10  # steps between held-out readings at the current depth (the plain loop)
    checkpoint_every: int = 10
    trainer: str = "loop"  # "loop": our plain PyTorch loop; "hf": the Hugging Face Trainer with ShiftCallback
    save_models: list[str] = field(default_factory=lambda: ["shift"])  # arms whose final model is saved, per seed
    dtype: str = "float32"  # the weights trained: float32 or float64
    device: str = "auto"  # cuda (one GPU per process, by local rank) if there is one, else cpu
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2's fully_shard per decoder layer); unused in one process

    def validate(self, p: str = "") -> None:
        require(bool(self.model_path), f"{p}model_path", "a GGUF file or a save_pretrained folder", self.model_path)
        require(Path(self.model_path).exists(), f"{p}model_path", "an existing file or folder", self.model_path)
        require(
            self.data_path == PYDOC or Path(self.data_path).is_file(),
            f"{p}data_path",
            f"a readable UTF-8 text file or {PYDOC!r}",
            self.data_path,
        )
        require_seeds(self.seeds, f"{p}seeds")
        a, b = (list(self.loop_layers) + [0, 0])[:2]
        ok = len(self.loop_layers) == 2 and 0 <= a < b
        require(ok, f"{p}loop_layers", "[start, stop] with 0 <= start < stop", self.loop_layers)
        require(self.n_loops >= 2, f"{p}n_loops", "an integer >= 2", self.n_loops)
        require(
            {1, self.n_loops} <= set(self.test_loops) and len(set(self.test_loops)) == len(self.test_loops),
            f"{p}test_loops",
            f"distinct loop counts that include 1 and n_loops ({self.n_loops}), which the tests compare",
            self.test_loops,
        )
        require(
            "plain" in self.arms and set(self.arms) <= set(ARMS) and len(set(self.arms)) == len(self.arms),
            f"{p}arms",
            f"plain and any of {list(ARMS[1:])}, each once",
            self.arms,
        )
        for name in ("budget_steps", "batch_size", "eval_windows", "eval_every", "checkpoint_every", "lora_rank"):
            require(getattr(self, name) >= 1, f"{p}{name}", "an integer >= 1", getattr(self, name))
        require(self.context >= 2, f"{p}context", "an integer >= 2", self.context)
        require(0 < self.switch_fraction < 1, f"{p}switch_fraction", "a number in (0, 1)", self.switch_fraction)
        require(self.lr > 0, f"{p}lr", "a number > 0", self.lr)
        require(self.weight_decay >= 0, f"{p}weight_decay", "a number >= 0", self.weight_decay)
        require(self.clip is None or self.clip > 0, f"{p}clip", "null (no clip) or a number > 0", self.clip)
        k = self.backprop_loops
        require(k is None or 1 <= k <= self.n_loops, f"{p}backprop_loops", f"null or 1..n_loops ({self.n_loops})", k)
        require(self.trainer in TRAINERS, f"{p}trainer", f"one of {list(TRAINERS)}", self.trainer)
        require(set(self.save_models) <= set(self.arms), f"{p}save_models", "arms of the study", self.save_models)
        require(self.dtype in DTYPES, f"{p}dtype", f"one of {list(DTYPES)}", self.dtype)
        require(self.device in ("auto", "cpu", "cuda"), f"{p}device", "one of ['auto', 'cpu', 'cuda']", self.device)
        cuda = self.device != "cuda" or torch.cuda.is_available()
        require(cuda, f"{p}device", "auto or cpu on a machine without CUDA", self.device)
        require(self.parallel in PARALLEL, f"{p}parallel", f"one of {list(PARALLEL)}", self.parallel)


class Text:
    """A text as the model's tokens (UTF-8 bytes for a model saved without a tokenizer): the first 90% by
    characters trains, on windows drawn from the seed and the step alone; the rest is held out, read as
    consecutive windows."""

    def __init__(self, cfg: LMRetrofitConfig, tokenizer, vocab_size: int):
        if cfg.data_path == PYDOC:
            import pydoc_data.topics

            text = "\n".join(pydoc_data.topics.topics.values())
        else:
            try:
                text = Path(cfg.data_path).read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                where = f"{cfg.data_path}: {error.reason} at byte {error.start}"
                raise ConfigError(f"data_path must be UTF-8 text ({where})") from None
        cut = int((1 - HELD_OUT) * len(text))
        self.train_ids, self.test_ids = (self._encode(part, tokenizer, vocab_size) for part in (text[:cut], text[cut:]))
        self.cfg, self.tokenizer = cfg, tokenizer
        need = cfg.context + 1
        if len(self.train_ids) < need or len(self.test_ids) < cfg.eval_windows * cfg.context:
            raise ConfigError(
                f"data_path must give at least {need} training and {cfg.eval_windows * cfg.context} held-out tokens "
                f"for context {cfg.context} and eval_windows {cfg.eval_windows} (got {len(self.train_ids)} and "
                f"{len(self.test_ids)} from {cfg.data_path!r})"
            )

    @staticmethod
    def _encode(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
        if tokenizer is None:
            if vocab_size < 256:
                need = "a tokenizer, or a vocabulary of at least 256 to read bytes"
                raise ConfigError(f"model_path must hold {need} (got {vocab_size} tokens and no tokenizer)")
            return torch.tensor(list(text.encode("utf-8")))
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    def batch(self, seed: int, step: int) -> torch.Tensor:
        """Step ``step``'s windows of ``context`` tokens: the same for every arm and on resume."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        starts = torch.randint(0, len(self.train_ids) - self.cfg.context, (self.cfg.batch_size,), generator=g)
        return self.train_ids[starts[:, None] + torch.arange(self.cfg.context)]

    def held_out(self) -> list[torch.Tensor]:
        n, c = self.cfg.eval_windows, self.cfg.context
        rows = self.test_ids[: n * c].view(n, c)
        return list(rows.split(8))


def load_plain(path: str, dtype: str = "float32") -> torch.nn.Module:
    """The pretrained causal LM at ``path`` (a GGUF, dequantised, or a save_pretrained folder), unlooped, in
    ``dtype``."""
    from transformers import AutoModelForCausalLM

    gguf = gguf_file(path)
    try:
        model = load_gguf(gguf) if gguf is not None else AutoModelForCausalLM.from_pretrained(path)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"model_path must be a GGUF file or a save_pretrained causal LM ({path}: {reason})") from None
    if getattr(model.config, "loopscape", None) is not None:
        raise ConfigError(f"model_path must be a plain (not loopified) checkpoint (got {path!r})")
    return model.to(DTYPES[dtype])


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over the held-out windows."""
    training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for w in windows:
        w = w.to(device)
        logits = model(input_ids=w, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(training)
    return math.exp(total / count)


def perplexities(model: torch.nn.Module, cfg: LMRetrofitConfig, text: Text) -> dict[str, float]:
    """Held-out perplexity of a looped model at each of ``cfg.test_loops``, keyed by the count as text (JSON)."""
    held_out = text.held_out()
    out = {}
    for n in cfg.test_loops:
        with loop_settings(model, n_loops=n):
            out[str(n)] = perplexity(model, held_out)
    return out


def schedule(cfg: LMRetrofitConfig, arm: str, seed: int) -> ShiftSchedule | None:
    """The arm's loop count per step (None: the plain arm)."""
    if arm == "plain":
        return None
    if arm == "loop":
        return ShiftSchedule(cfg.n_loops, at=0)
    at = max(1, int(cfg.switch_fraction * cfg.budget_steps))
    ramp = max(1, round((1 - cfg.switch_fraction) * cfg.budget_steps / 2))  # half of Stage II's budget, in plain steps
    return ShiftSchedule(cfg.n_loops, at=at, ramp="linear", ramp_steps=ramp, seed=seed)


def cfg_device(cfg: LMRetrofitConfig) -> torch.device:
    """The study's device: a GPU per process (by ``LOCAL_RANK``) when asked for or there is one."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_arm(base: torch.nn.Module, cfg: LMRetrofitConfig, arm: str, seed: int = 0) -> torch.nn.Module:
    """A copy of the pretrained model, looped as the arm says; new weights (the LoRA's A) drawn from ``seed``
    alone, so a resumed run builds the arm a whole run built."""
    model = copy.deepcopy(base).to(cfg_device(cfg))
    if arm == "plain":
        return model
    options = {"backprop_loops": cfg.backprop_loops, "injection": "add"}
    if arm == "shift-lora":
        options.update(loop_lora=cfg.lora_rank, backprop_loops=None)
    if arm == "shift-concat":
        options["injection"] = "concat"
    with seeded(seed):
        return loopify(model, layers=tuple(cfg.loop_layers), n_loops=cfg.n_loops, **options)


def step_cost(model: torch.nn.Module, cfg: LMRetrofitConfig, k: int) -> float:
    """The training FLOPs of one step at ``k`` loops (:func:`~loopscape.experiments.retrofit.step_flops`)."""
    probe = torch.zeros(cfg.batch_size, cfg.context, dtype=torch.long)
    if looped_layers(model) is None:
        return step_flops(model, probe)
    with loop_settings(model, n_loops=k):
        return step_flops(model, probe)


def plan(model: torch.nn.Module, cfg: LMRetrofitConfig, sched: ShiftSchedule | None, budget: float) -> list[int]:
    """The loop count of every step that fits in ``budget`` FLOPs (the schedule is fixed in advance)."""
    cost: dict[int, float] = {}
    depths, spent = [], 0.0
    while True:
        k = 1 if sched is None else sched.n_loops_at(len(depths) + 1)
        if k not in cost:
            cost[k] = step_cost(model, cfg, k)
        if spent + cost[k] > budget * (1 + 1e-9):
            return depths
        depths.append(k)
        spent += cost[k]


def optimizer_for(model: torch.nn.Module, cfg: LMRetrofitConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_loop(model, cfg: LMRetrofitConfig, text: Text, seed: int, sched, depths, folder: Path) -> dict:
    """Our plain PyTorch loop: SHIFT's controller sets each step's depth; checkpoints every
    ``checkpoint_every`` steps; resumes from the last one. Under ``torchrun`` each rank trains on its share of
    every step's batch (rows ``rank::world``), the model wrapped by ``cfg.parallel``, so a step is the
    one-process step with the gradient averaged across ranks; the checkpoints hold the gathered state."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    run = data_parallel(model, Structure(model).layers, cfg.parallel) if world > 1 else model
    opt = optimizer_for(model, cfg)
    controller = ShiftController(sched, model, opt) if sched is not None else None
    held_out = text.held_out()
    state = {"flops": 0.0, "time_s": 0.0, "losses": [], "readings": []}
    last = latest_checkpoint(folder / "checkpoints")
    start = 1
    if last is not None:
        saved = load_gathered_checkpoint(last, model, opt) if world > 1 else load_checkpoint(last, model, opt)
        state, start = saved["extra"], saved["done"] + 1
    model.train()
    t0 = time.perf_counter() - state["time_s"]
    for step in range(start, len(depths) + 1):
        if controller is not None:
            controller.before_step(step)
        x = text.batch(seed, step)
        mine = x[rank::world].to(device)
        loss = run(input_ids=mine, labels=mine, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or math.inf)
        mean_loss = loss.detach().clone()
        if world > 1:  # every rank logs, and checks, the step's loss over the whole batch
            torch.distributed.all_reduce(mean_loss)
            mean_loss /= world
        check_finite({"loss": mean_loss.item(), "grad_norm": norm.item()}, f"seed {seed}, step {step}", "lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["flops"] += step_flops(model, x)
        state["losses"].append(round(mean_loss.item(), 6))
        if step % cfg.eval_every == 0 or step == len(depths):
            state["readings"].append({"step": step, "flops": state["flops"], "perplexity": perplexity(model, held_out)})
        if step % cfg.checkpoint_every == 0 and step < len(depths):
            state["time_s"] = time.perf_counter() - t0
            if world > 1:
                save_gathered_checkpoint(folder / "checkpoints", step, model, opt, extra=state)
            else:
                save_checkpoint(folder / "checkpoints", step, model, opt, extra=state, unit="step")
    state["time_s"] = time.perf_counter() - t0
    return state


def train_hf(model, cfg: LMRetrofitConfig, text: Text, seed: int, sched, depths, folder: Path) -> dict:
    """The Hugging Face ``Trainer`` with :class:`~loopscape.integrations.hf.ShiftCallback` (what a user of
    transformers writes); its checkpoints every ``checkpoint_every`` steps, resumed by the Trainer."""
    import transformers
    from transformers.utils import logging as hf_logging

    from loopscape.integrations.hf import ShiftCallback

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(depths) * cfg.batch_size

        def __getitem__(self, i):
            x = text.batch(seed, i // cfg.batch_size + 1)[i % cfg.batch_size]
            return {"input_ids": x, "labels": x}

    args = transformers.TrainingArguments(
        output_dir=str(folder / "hf"),
        max_steps=len(depths),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant",
        max_grad_norm=cfg.clip if cfg.clip is not None else 0.0,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=1,
        logging_steps=1,
        report_to=[],
        seed=seed,
        use_cpu=cfg_device(cfg).type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = []
    if sched is not None:
        c = sched.config
        callbacks.append(ShiftCallback(n_loops=c.n_loops, at=c.at, ramp=c.ramp, ramp_steps=c.ramp_steps, seed=c.seed))

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # step s reads the windows of step s, as our loop does
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=Windows(), callbacks=callbacks)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the study prints its own lines
    t0 = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder / "hf"))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    losses = [round(r["loss"], 6) for r in trainer.state.log_history if "loss" in r]
    flops = sum(step_cost(model, cfg, k) * steps for k, steps in Counter(depths).items())
    return {"flops": flops, "time_s": time.perf_counter() - t0, "losses": losses, "readings": []}


def last_complete_checkpoint(folder: Path) -> str | None:
    """The Trainer's last checkpoint that was written to the end (its ``trainer_state.json``, written last,
    reads back); torn ones, from a kill while saving, are removed (the Trainer would resume from them)."""
    found = None
    steps = sorted((int(p.name[11:]), p) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit())
    for _, path in steps:
        try:
            read_json_file(path / "trainer_state.json")
            found = str(path)
        except DamagedRunError:
            shutil.rmtree(path, ignore_errors=True)
    return found


def run_arm(base, cfg: LMRetrofitConfig, text: Text, seed: int, arm: str, budget: float, folder: Path) -> dict:
    """One (seed, arm): trained at equal FLOPs, then scored at every test loop count; written once."""
    done = folder / "result.json"
    if done.exists():
        return read_json_file(done)
    _, world = rank_and_world()
    folder.mkdir(parents=True, exist_ok=True)
    model = build_arm(base, cfg, arm, seed)
    sched = schedule(cfg, arm, seed)
    depths = plan(model, cfg, sched, budget)
    train = train_hf if cfg.trainer == "hf" else train_loop
    trained = train(model, cfg, text, seed, sched, depths, folder)
    if arm == "plain":
        loopify(model, layers=tuple(cfg.loop_layers))  # its untrained loops, read at the test counts
    per_loop = perplexities(model, cfg, text)
    looped = looped_layers(model)
    if arm in cfg.save_models:
        weights = None
        if world > 1:  # the whole weights, gathered from the shards (every rank takes part)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=options)
        on_rank0(save_model, model, folder / "model", state_dict=weights, tokenizer=text.tokenizer)
    result = {
        "arm": arm,
        "seed": seed,
        "steps": len(depths),
        "depths": depths,
        "trained_loops": 1 if arm == "plain" else cfg.n_loops,
        "flops": trained["flops"],
        "budget_flops": budget,
        "time_s": trained["time_s"],
        "losses": trained["losses"],
        "readings": trained["readings"],
        "perplexity": per_loop,
        "backprop_loops": None if looped is None or arm == "plain" else looped.backprop_loops,
    }
    on_rank0(finish_arm, folder, result)
    return result


def finish_arm(folder: Path, result: dict) -> None:
    write_json(folder / "result.json", result)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the arm is done: its result is what stays
    shutil.rmtree(folder / "hf", ignore_errors=True)


def check_plans(cfg: LMRetrofitConfig, model: torch.nn.Module, budget: float) -> None:
    """Before any run folder: the model loops (its layout, the range inside it), and every arm's budget holds a
    step, and SHIFT's reaches its full depth."""
    n = len(Structure(model).layers)
    need = f"[start, stop] with 0 <= start < stop <= {n} (the model's layers)"
    require(cfg.loop_layers[1] <= n, "loop_layers", need, cfg.loop_layers)
    for arm in cfg.arms:
        depths = plan(build_arm(model, cfg, arm), cfg, schedule(cfg, arm, 0), budget)
        require(
            bool(depths) and (arm == "plain" or max(depths) == cfg.n_loops),
            "budget_steps",
            f"enough plain steps for every arm to reach {cfg.n_loops} loops ({arm} runs {depths})",
            cfg.budget_steps,
        )


def score_untrained(base: torch.nn.Module, cfg: LMRetrofitConfig, text: Text, path: Path) -> None:
    """The pretrained model's untrained loops at every test count, written to ``path``."""
    untrained = loopify(copy.deepcopy(base).to(cfg_device(cfg)), layers=tuple(cfg.loop_layers))
    write_json(path, {"perplexity": perplexities(untrained, cfg, text)})


def run_lm_retrofit(cfg: LMRetrofitConfig, out: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Every seed and arm (each resumed where it stopped); writes ``retrofit.json``, ``retrofit.md``,
    ``report.html`` and the figures into ``out``; returns the content of ``retrofit.json``."""
    out = Path(out)
    rank, world = rank_and_world()
    if world > 1:
        if cfg.trainer == "hf":
            raise ConfigError(
                "trainer must be 'loop' under torchrun (got 'hf'): run trainer=hf in one process; several processes "
                "train through our loop (parallel: ddp or fsdp)"
            )
        init_distributed(cfg_device(cfg).type)
    base = load_plain(cfg.model_path, cfg.dtype)  # bad input (the model, its layers, a short text) before the folder
    budget = cfg.budget_steps * step_cost(base, cfg, 1)
    check_plans(cfg, base, budget)
    text = Text(cfg, load_tokenizer(cfg.model_path), base.config.vocab_size)
    require(
        cfg.batch_size % world == 0, "batch_size", f"a multiple of the number of processes ({world})", cfg.batch_size
    )
    on_rank0(prepare_run_folder, out, cfg, resume=resume)
    untrained_file = out / "untrained.json"
    if not untrained_file.exists():
        on_rank0(score_untrained, base, cfg, text, untrained_file)
    untrained = read_json_file(untrained_file)
    runs: dict[int, dict] = {}
    for seed in cfg.seeds:
        runs[seed] = {}
        for arm in cfg.arms:
            if show_progress and rank == 0:
                print(f"retrofit: seed {seed}, arm {arm} ...", flush=True)
            runs[seed][arm] = run_arm(base, cfg, text, seed, arm, budget, out / f"seed{seed}" / arm)
    result = {"config": to_dict(cfg), "untrained": untrained, "runs": {str(s): r for s, r in runs.items()}}
    if rank == 0:
        write_report(cfg, runs, result, out)
    return result


def write_report(cfg: LMRetrofitConfig, runs: dict[int, dict], result: dict, out: Path) -> None:
    """Add the verdicts and tests to ``result``; write it as ``retrofit.json``, with ``retrofit.md``,
    ``report.html`` and the figures."""
    rows, tests = lm_verdicts(cfg, runs)
    figures = lm_figures(cfg, runs, result["untrained"], out)
    text_md = lm_markdown(cfg, runs, result["untrained"], rows, figures)
    result.update(verdicts=rows, tests=tests)
    write_json(out / "retrofit.json", result)
    atomic_write_text(out / "retrofit.md", text_md)
    page = render_report(
        "loopscape: retrofitted recurrence on a pretrained model",
        "A pretrained decoder's middle layers looped and trained on real text, against continuing it plain, at "
        "equal training FLOPs.",
        rows,
        [Section("retrofit", "Retrofit on real text", text_md)],
        yaml.safe_dump(to_dict(cfg), sort_keys=False),
        versions(),
    )
    atomic_write_text(out / "report.html", page)
