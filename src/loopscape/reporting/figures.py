"""Figures of the Markov study, as PNG (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loopscape.data.markov import MarkovTask  # noqa: E402
from loopscape.io import atomic_write_bytes  # noqa: E402

PHASE_EPOCH = 150  # Section 4.1: the epoch after which the paper sees the two models part
LABELS = {"single_attn": "Single-Attn", "looped_attn": "Looped-Attn"}
GROUPS = {"acc_low": ("low IC", "tab:green"), "acc_high": ("high IC", "tab:red"), "acc_all": ("all", "tab:blue")}


def save_figure(fig: plt.Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_ic_distribution(task: MarkovTask, path: str | Path) -> None:
    """Figure 3a: the long-tailed IC distribution of the training set, IC groups marked."""
    ic = task.train.ic.numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(ic.min(), ic.max(), 30)
    mid = ~(task.low | task.high)
    groups = [
        (task.low, "low IC (lowest 40%)", "tab:green"),
        (mid, "middle 20%", "grey"),
        (task.high, "high IC (highest 40%)", "tab:red"),
    ]
    ax.hist(
        [ic[m.numpy()] for m, _, _ in groups],
        bins=bins,
        stacked=True,
        color=[c for *_, c in groups],
        label=[label for _, label, _ in groups],
    )
    ax.set_xlabel("information content IC(X) = -log2 P(X)  [bits]")
    ax.set_ylabel("training sequences")
    ax.set_title(f"Training set: N = {len(ic)}, max IC = {ic.max():.2f} bits")
    ax.legend()
    save_figure(fig, Path(path))


def plot_accuracy_curves(
    metrics: dict[str, dict[str, np.ndarray]], path: str | Path, ceiling: dict | None = None
) -> None:
    """Figure 3b: training accuracy on low / high / all IC per epoch, mean and min-max band over seeds."""
    names = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for key, (label, color) in GROUPS.items():
            a = 100 * metrics[name][key]
            x = np.arange(a.shape[1])
            ax.plot(x, a.mean(0), color=color, label=label, lw=1.4)
            ax.fill_between(x, a.min(0), a.max(0), color=color, alpha=0.2, lw=0)
            if ceiling is not None:
                ax.axhline(100 * ceiling[key[4:]], color=color, ls=":", lw=1)
        if a.shape[1] - 1 > PHASE_EPOCH:  # the axis follows the epochs run: no boundary past its end
            ax.axvline(PHASE_EPOCH, color="k", ls="--", lw=0.8)
        ax.set_xlim(0, a.shape[1] - 1)
        ax.set_title(f"{LABELS.get(name, name)} ({a.shape[0]} seeds)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("training accuracy [%]")
    np.atleast_1d(axes)[0].legend(loc="lower right", title="dotted: Bayes-optimal predictor")
    save_figure(fig, Path(path))


def plot_ic_and_cp(task: MarkovTask, path: str | Path) -> None:
    """Figure 9(a), both panels: (a) the training set's IC histogram; (b) "CP", which the paper does not
    define: read here as the chain probability P(X) = 2^-IC of each distinct training sequence, ranked, with
    how many copies of it the tilted oversampling put in the training set (the long tail, seen from the
    probability side)."""
    ic = task.train.ic.numpy()
    seqs = np.concatenate([task.train.inputs.numpy(), task.train.targets.numpy()[:, None]], axis=1)
    distinct, first, counts = np.unique(seqs, axis=0, return_index=True, return_counts=True)
    p = 2.0 ** -ic[first]
    order = np.argsort(-p)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].hist(ic, bins=30, color="tab:blue")
    axes[0].set(xlabel="IC(X) [bits]", ylabel="training sequences", title=f"(a) IC, N = {len(ic)}")
    rank = np.arange(1, len(order) + 1)
    axes[1].bar(rank, counts[order], color="tab:blue", label="copies in the training set")
    twin = axes[1].twinx()
    twin.plot(rank, p[order], "k.-", ms=3, label="P(X)")
    twin.set(yscale="log", ylabel="chain probability P(X)")
    axes[1].set(
        xlabel="distinct sequence, ranked by P(X)",
        ylabel="copies",
        title=f"(b) CP (read as P(X)): {len(distinct)} distinct sequences",
    )
    axes[1].legend(loc="upper right", fontsize=8)
    save_figure(fig, Path(path))


def plot_test_ic(sets: dict[int, object], threshold: float, path: str | Path) -> None:
    """Figure 7: the IC distribution of each test length's sequences (and the training length's), with the
    fixed 'simple' threshold (the largest training IC): as L grows the mean moves right and the spread widens."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(float(s.ic.max()) for s in sets.values())
    bins = np.linspace(0, top, 50)
    for i, (L, s) in enumerate(sorted(sets.items())):
        ic = s.ic.numpy()
        label = f"L = {L}{' (training)' if i == 0 else ''}, mean {ic.mean():.1f} bits"
        ax.hist(ic, bins=bins, histtype="step", lw=1.4, density=True, label=label)
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"simple: IC <= {threshold:.2f}")
    ax.set(xlabel="IC(X) [bits]", ylabel="density", title="Figure 7: IC of the test sets by length")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
