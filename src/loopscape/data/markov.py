"""The synthetic Markov language of Section 4.1 / Appendix E.1.1.

A sequence ``X = (x_0, ..., x_{L-1})`` over ``V`` tokens has probability

    P(X) = P(x_0) * prod_k T_k[x_{k-1}, x_k],     P(x_0) = 1 / V,

with ``L - 1`` distinct random transition matrices ``T_1..T_{L-1}``; at test
lengths longer than the training length they are applied cyclically
(Appendix E.1.3). The difficulty of a sequence is its information content
``IC(X) = -log2 P(X)``.

Two points the paper leaves open, and the reading taken here:

* **Transition matrices.** Each row has i.i.d. ``Uniform(0, 1)`` entries,
  normalised to sum to one (the usual "random stochastic matrix" of research
  code). Of the distributions tried, this is the one whose *data* statistics
  match the paper's Table 1 "# Simple Sequences" column (share of test
  sequences with IC below the largest training IC: 99.5% / 64.5% / 0 at
  L = 8 / 11 / 14); rows uniform on the simplex (Dirichlet(1)) leave ~90% at
  L = 14. See ``docs/markov.md``.
* **IC unit.** Bits. With V = 3 a tilted transition costs at most
  ``log 3 = 1.1`` nats, so in nats no L = 11 test set could have the paper's
  35% of sequences above IC = 14.57; in bits the numbers fit.

The training set (Appendix E.1.1) is every one of the ``V^L`` sequences once,
"expanded" to ``N`` by drawing ``N - V^L`` more with probability proportional
to ``P(X)^alpha``. Test sets draw ``N_test`` sequences from the same tilted
law exactly, even where ``V^L`` cannot be enumerated: ``P(X)^alpha`` is itself
a (non-homogeneous) Markov chain with weights ``T_k^alpha``, sampled forwards
with backward messages.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from loopscape.config import require, require_fits

ROWS = ("uniform", "dirichlet", "softmax")  # a transition row: normalised U(0,1) entries, Dirichlet(1), softmax(N(0,1))
TEST_TARGETS = ("cyclic", "aligned")
# the default language: data seed chosen by the paper's data facts alone (loopscape.data.languages; docs/markov.md)
DEFAULT_LANGUAGE_SEED = 24


@dataclass(frozen=True)
class SequenceSet:
    """A set of sequences with their information content.

    ``tokens`` is ``(N, L)``; a model reads ``inputs`` (the first ``L - 1``
    tokens) and predicts ``targets`` (the last one).
    """

    tokens: torch.Tensor  # (N, L) int64
    ic: torch.Tensor  # (N,) float64, bits

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, -1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def ic_groups(self, low_frac: float = 0.4, high_frac: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of the lowest ``low_frac`` and highest ``high_frac``
        of sequences by IC (Section 4.1: 'low information' / 'high information').

        Ranks, not IC values, decide membership, so each group has exactly
        ``floor(frac * N)`` members even when many sequences share an IC;
        ties are broken by position in the set (a stable sort).
        """
        n = len(self)
        order = torch.argsort(self.ic, stable=True)
        low = torch.zeros(n, dtype=torch.bool)
        high = torch.zeros(n, dtype=torch.bool)
        low[order[: int(low_frac * n)]] = True
        high[order[n - int(high_frac * n) :]] = True
        return low, high


class MarkovLanguage:
    """A Markov language: ``V`` tokens, ``L - 1`` transition matrices, uniform start.

    Args:
        vocab_size: ``V`` (3 in the paper: {a, b, c}).
        length: training sequence length ``L`` (4 in the paper); the language has
            ``L - 1`` transition matrices.
        seed: seed of the transition matrices.
    """

    def __init__(self, vocab_size: int = 3, length: int = 4, seed: int = 0, rows: str = "uniform"):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (got {vocab_size})")
        if length < 2:
            raise ValueError(f"length must be >= 2 (got {length})")
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS} (got {rows!r})")
        self.vocab_size = vocab_size
        self.length = length
        rng = np.random.default_rng(seed)
        shape = (length - 1, vocab_size, vocab_size)
        if rows == "dirichlet":  # uniform on the simplex
            self.transitions = rng.dirichlet(np.ones(vocab_size), size=shape[:2])
            return
        raw = rng.random(shape) if rows == "uniform" else np.exp(rng.standard_normal(shape))
        self.transitions = raw / raw.sum(axis=-1, keepdims=True)  # (L-1, V, V), rows sum to 1

    def transition(self, step: int) -> np.ndarray:
        """``T_step`` for ``step = 1, 2, ...``, cycling past ``L - 1`` (Appendix E.1.3)."""
        return self.transitions[(step - 1) % (self.length - 1)]

    def aligned(self, length: int) -> MarkovLanguage:
        """The same language with its transitions rotated so that a sequence of ``length`` ends
        with ``T_{L-1}``, the transition that makes every training target.

        The paper applies the transitions cyclically from the start (E.1.3): at
        ``L = 4`` and test lengths 8, 11, 14, 17 every test target is made by
        ``T_1``. This is the other reading of "applied cyclically", for Table 1
        under open readings (``data.test_targets: aligned``).
        """
        rotated = copy.copy(self)
        rotated.transitions = np.roll(self.transitions, -((self.length - length) % (self.length - 1)), axis=0)
        return rotated

    def test_law(self, length: int, targets: str) -> MarkovLanguage:
        """The law of a test set at ``length`` (E.1.3): ``"cyclic"``, the transitions applied cyclically
        from the start (the paper's words); ``"aligned"``, the cycle rotated so that the training
        targets' transition ``T_{L-1}`` makes the target (the reading that keeps "the same dynamics")."""
        if targets not in TEST_TARGETS:
            raise ValueError(f"test targets must be one of {TEST_TARGETS} (got {targets!r})")
        return self.aligned(length) if targets == "aligned" else self

    def bayes_prediction(self, inputs: torch.Tensor) -> torch.Tensor:
        """The population's Bayes-optimal next token at any length: the bigram rule
        ``argmax_y T_k[x_last, y]`` of the transition ``k`` that makes the target. The chain is
        first-order Markov, so the target depends on the input through its last token alone, and
        the tilt ``P(X)^alpha`` does not move an argmax."""
        k = inputs.shape[1]  # the target is token k (0-based), made by transition k
        return torch.from_numpy(self.transition(k).argmax(axis=1))[inputs[:, -1]]

    def bayes_accuracy(self, alpha: float, length: int) -> float:
        """The exact accuracy of :meth:`bayes_prediction` on sequences of ``length`` drawn ``∝ P(X)^alpha``:
        the tilted chain's marginal of the last transition's pair ``(x_{L-2}, x_{L-1})`` from forward messages
        (the weights of the end are all one), so any length is exact without enumerating ``V^L``."""
        f = np.ones(self.vocab_size)
        for k in range(1, length - 1):
            f = f @ self.transition(k) ** alpha
            f /= f.sum()
        last = self.transition(length - 1)
        joint = f[:, None] * last**alpha  # ∝ P(x_{L-2}, x_{L-1}) under the tilt
        hits = joint[np.arange(self.vocab_size), last.argmax(axis=1)]
        return float(hits.sum() / joint.sum())

    # -- exact probabilities -------------------------------------------------------
    def log2_prob(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """``log2 P(X)`` for each row of ``tokens`` (any length >= 1)."""
        x = np.asarray(tokens, dtype=np.int64)
        out = np.full(x.shape[0], -np.log2(self.vocab_size))
        for k in range(1, x.shape[1]):
            out += np.log2(self.transition(k)[x[:, k - 1], x[:, k]])
        return out

    def information_content(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """``IC(X) = -log2 P(X)`` in bits."""
        return -self.log2_prob(tokens)

    def enumerate(self, length: int | None = None) -> np.ndarray:
        """All ``V^L`` sequences, in lexicographic order."""
        length = self.length if length is None else length
        return np.array(list(itertools.product(range(self.vocab_size), repeat=length)), dtype=np.int64)

    def tilted_probabilities(self, alpha: float, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence of ``length`` and its probability under ``P(X)^alpha / Z``."""
        seqs = self.enumerate(length)
        logw = alpha * self.log2_prob(seqs)
        w = np.exp2(logw - logw.max())
        return seqs, w / w.sum()

    # -- samplers ------------------------------------------------------------------
    def sample_enumerated(
        self, n: int, alpha: float, rng: np.random.Generator, length: int | None = None
    ) -> np.ndarray:
        """``n`` i.i.d. sequences drawn ``proportional to P(X)^alpha`` by enumeration."""
        seqs, p = self.tilted_probabilities(alpha, length)
        return seqs[rng.choice(len(seqs), size=n, p=p)]

    def sample_tilted_chain(self, n: int, alpha: float, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` i.i.d. sequences of ``length`` drawn exactly ``proportional to P(X)^alpha``.

        ``P(X)^alpha`` factorises over the chain with weights ``T_k^alpha``; the
        backward messages ``beta_{k-1}(x) = sum_y T_k[x, y]^alpha beta_k(y)``
        turn it into forward conditionals
        ``p(x_k | x_{k-1}) ∝ T_k[x_{k-1}, x_k]^alpha beta_k(x_k)``.
        Messages are renormalised at every step (only ratios matter), so any
        length is fine in float64.
        """
        V = self.vocab_size
        beta = [np.ones(V)] * length
        for k in range(length - 1, 0, -1):
            b = (self.transition(k) ** alpha) @ beta[k]
            beta[k - 1] = b / b.sum()
        x = np.empty((n, length), dtype=np.int64)
        x[:, 0] = rng.choice(V, size=n, p=beta[0] / beta[0].sum())
        for k in range(1, length):
            w = self.transition(k)[x[:, k - 1]] ** alpha * beta[k][None, :]
            cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
            u = rng.random(n)[:, None]
            x[:, k] = np.minimum((u > cdf).sum(axis=1), V - 1)
        return x

    # -- the paper's data sets ---------------------------------------------------------
    def _as_set(self, tokens: np.ndarray) -> SequenceSet:
        return SequenceSet(torch.from_numpy(tokens), torch.from_numpy(self.information_content(tokens)))

    def training_set(self, n: int, alpha: float, rng: np.random.Generator, include_all: bool = True) -> SequenceSet:
        """Appendix E.1.1: all ``V^L`` sequences, oversampled to ``n`` by ``P(X)^alpha``.

        With ``include_all=False``, or if ``n < V^L`` (the set cannot hold every
        sequence), it is ``n`` tilted draws.
        """
        base = self.enumerate()
        if not include_all or n < len(base):
            return self._as_set(self.sample_enumerated(n, alpha, rng))
        extra = self.sample_enumerated(n - len(base), alpha, rng)
        return self._as_set(np.concatenate([base, extra]))

    def sample_set(self, n: int, alpha: float, length: int, rng: np.random.Generator) -> SequenceSet:
        """``n`` tilted draws at ``length`` (validation and test sets, Appendix E.1.3)."""
        return self._as_set(self.sample_tilted_chain(n, alpha, length, rng))


def bayes_ceiling(train: SequenceSet) -> torch.Tensor:
    """Per-sequence indicator that a deterministic predictor *can* get it right.

    The target is random given the input, so sequences sharing an input can
    disagree on the target. The best any model can do on the training set is
    to predict, for each input, its most frequent target there; this marks the
    sequences that choice gets right (ties: the smallest token). Its mean is
    the highest training accuracy any model can reach; its mean over an IC
    group is the Bayes-optimal predictor's accuracy there (not a bound for the
    group alone: a model may trade low-IC accuracy for high-IC accuracy).
    """
    inputs = [tuple(r) for r in train.inputs.tolist()]
    counts: dict[tuple, dict[int, int]] = {}
    for inp, y in zip(inputs, train.targets.tolist()):
        counts.setdefault(inp, {}).setdefault(y, 0)
        counts[inp][y] += 1
    best = {inp: max(sorted(c), key=lambda y: c[y]) for inp, c in counts.items()}
    return torch.tensor([best[inp] == y for inp, y in zip(inputs, train.targets.tolist())])


@dataclass
class MarkovDataConfig:
    """The Markov language and its data sets (Appendix E.1.1, E.1.3)."""

    vocab_size: int = 3
    length: int = 4
    n_train: int = 500
    n_val: int = 500
    alpha: float = 2.0
    # the language: the best fit to the paper's data facts among seeds 0-399 (data.languages; docs/markov.md)
    seed: int = DEFAULT_LANGUAGE_SEED
    rows: str = "uniform"  # how a transition row is drawn (ROWS)
    include_all: bool = True  # training set = every sequence once + tilted draws (E.1.1)
    test_lengths: list[int] = field(default_factory=lambda: [8, 11, 14, 17])
    n_test: int = 5000
    # test targets: "aligned", the cycle rotated so the training targets' transition makes every test target
    # (E.1.3's "same dynamics": the phase-consistent reading), or "cyclic", applied from the start (the paper's words)
    test_targets: str = "aligned"

    def validate(self, p: str = "") -> None:
        require(self.vocab_size >= 2, f"{p}vocab_size", "an integer >= 2", self.vocab_size)
        require(self.length >= 2, f"{p}length", "an integer >= 2", self.length)
        require(self.n_train >= 1, f"{p}n_train", "an integer >= 1", self.n_train)
        require(self.n_val >= 1, f"{p}n_val", "an integer >= 1", self.n_val)
        require(self.alpha > 0, f"{p}alpha", "a number > 0", self.alpha)
        require(self.rows in ROWS, f"{p}rows", f"one of {ROWS}", self.rows)
        require(self.n_test >= 1, f"{p}n_test", "an integer >= 1", self.n_test)
        require(self.test_targets in TEST_TARGETS, f"{p}test_targets", f"one of {TEST_TARGETS}", self.test_targets)
        require(len(self.test_lengths) >= 1, f"{p}test_lengths", "a non-empty list of lengths", self.test_lengths)
        for L in self.test_lengths:
            require(L >= self.length, f"{p}test_lengths", f"lengths >= the training length {self.length}", L)
        # the training set enumerates all V^L sequences (and draws from them by enumeration)
        require_fits(
            4 * 8 * self.length * self.vocab_size**self.length,
            f"{p}vocab_size, length",
            [self.vocab_size, self.length],
            f"the {self.vocab_size}^{self.length} sequences the training set enumerates",
        )
        # tokens (int64) and IC (float64) of every set, with room for the samplers' working copies
        size = 16 * 4 * ((self.n_train + self.n_val) * self.length + self.n_test * sum(self.test_lengths))
        require_fits(size, f"{p}n_train, n_val, n_test", [self.n_train, self.n_val, self.n_test], "the data sets")


@dataclass
class MarkovTask:
    """What a run trains and evaluates on: the training set with its IC groups, and a validation set."""

    train: SequenceSet
    val: SequenceSet
    low: torch.Tensor  # bool mask over train: lowest-IC 40%
    high: torch.Tensor  # bool mask over train: highest-IC 40%


def build_task(data: MarkovDataConfig) -> tuple[MarkovLanguage, MarkovTask]:
    """The language, its training set (with IC groups) and a validation set.

    The validation set is ``n_val`` fresh tilted draws at the training length,
    from the same generator after the training set (the paper does not say
    what it validates on; SCP in Section 5 needs a validation loss).
    """
    lang = MarkovLanguage(data.vocab_size, data.length, seed=data.seed, rows=data.rows)
    rng = np.random.default_rng(data.seed)
    train_set = lang.training_set(data.n_train, data.alpha, rng, include_all=data.include_all)
    val_set = lang.sample_set(data.n_val, data.alpha, data.length, rng)
    low, high = train_set.ic_groups()
    return lang, MarkovTask(train_set, val_set, low, high)


def test_sets(lang: MarkovLanguage, data: MarkovDataConfig) -> dict[int, SequenceSet]:
    """``n_test`` tilted draws at every test length under ``data.test_targets``, each from its own fixed seed."""
    return {
        L: lang.test_law(L, data.test_targets).sample_set(
            data.n_test, data.alpha, L, np.random.default_rng([data.seed, L])
        )
        for L in data.test_lengths
    }
