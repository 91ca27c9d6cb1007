"""The algorithmic tasks of Appendix E.2 (after Fan et al., 2024): Parity, Copy,
Addition, Binary Sum, Unique Set and Multiplication, with full-output
prediction (FOP) rows and a length curriculum. Spec: ``shared/spec/algorithmic-tasks.md``.

A row is ``query, separator, answer slots``. The model reads

    input:   q_1 ... q_m  =  <pad> ... <pad>
    target:  .   ...  .   a_1 ... a_A  <pad>

position ``m`` (the separator) predicts ``a_1``, the next position ``a_2``,
and so on; after the answer the target is ``<pad>`` (end of sequence). Rows are
right-padded to the task's fixed width at the batch's largest length ``n``
(:data:`ROW_WIDTH`, the authors' code), so every row is scored on some trailing
pads and the width sets how much of the loss the answer carries. The loss mask
covers every position from the separator to the end of the row, and a row is
correct only if every masked position is (exact match).

Batches are generated as tensors on the fly from a ``torch.Generator``: no
Python loop over samples, so data costs little next to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("parity", "copy", "addition", "binary_sum", "unique_set", "multiplication")
UNIQUE_SET_VALUES = 50
# the authors' row width (input and target positions) at the batch's largest length n (spec, from their code)
ROW_WIDTH = {
    "parity": lambda n: n + 2,
    "copy": lambda n: 2 * (n + 1),
    "addition": lambda n: 3 * (n + 1),
    "binary_sum": lambda n: n + 8,
    "unique_set": lambda n: 2 * (n + 1),
    "multiplication": lambda n: 4 * (n + 1),
}
ROW_WIDTHS = ("task", "batch")  # the authors' fixed width, or the batch's widest row (an earlier reading)


@dataclass
class AlgorithmicBatch:
    """One batch of FOP rows (all ``(B, W)`` except ``n_loops``/``lengths``: ``(B,)``)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor  # bool: positions scored (from the separator on)
    n_loops: torch.Tensor  # T(n): loops after which this sample is supervised
    lengths: torch.Tensor  # n (for Multiplication the second operand's length n2)

    def split(self, parts: int, index: int) -> AlgorithmicBatch:
        """The ``index``-th of ``parts`` contiguous shards of the rows (data parallelism)."""

        def chunk(t):
            return t.tensor_split(parts)[index]

        return AlgorithmicBatch(*(chunk(t) for t in (self.inputs, self.targets, self.mask, self.n_loops, self.lengths)))


def _bits_to_int(bits: torch.Tensor, msb_first: bool) -> torch.Tensor:
    """``(B, n)`` bits -> ``(B,)`` int64 (``n <= 62``)."""
    n = bits.shape[1]
    powers = 2 ** torch.arange(n, device=bits.device)
    if msb_first:
        powers = powers.flip(0)
    return (bits.long() * powers).sum(1)


def _int_to_bits(values: torch.Tensor, n: int, msb_first: bool) -> torch.Tensor:
    bits = (values[:, None] >> torch.arange(n, device=values.device)) & 1  # LSB first
    return bits.flip(1) if msb_first else bits


def _pack(segments: list[tuple[torch.Tensor, torch.Tensor]], pad: int, width: int = 0) -> torch.Tensor:
    """Concatenate per-sample segments ``(tokens (B, S), lengths (B,))`` into rows right-padded
    to ``width`` (at least the longest row)."""
    B = segments[0][0].shape[0]
    device = segments[0][0].device
    total = sum(lens for _, lens in segments)
    width = max(width, int(total.max()))
    rows = torch.full((B, width + 1), pad, dtype=torch.long, device=device)  # last column: a bin for unused slots
    offset = torch.zeros(B, dtype=torch.long, device=device)
    for tokens, lens in segments:
        j = torch.arange(tokens.shape[1], device=device)
        idx = torch.where(j < lens[:, None], offset[:, None] + j, width)
        rows.scatter_(1, idx, tokens.long())
        offset = offset + lens
    return rows[:, :width]


class AlgorithmicTask:
    """One task: its vocabulary, loop count ``T(n)``, and batch sampler.

    Token ids: for bit tasks ``0`` and ``1`` are ids 0 and 1; Unique Set's
    values 0..49 are ids 0..49; then the operator (``+``/``x``) if any, ``=``
    and ``<pad>``.

    ``row_width``: ``"task"`` pads rows to the authors' fixed width
    (:data:`ROW_WIDTH`); ``"batch"`` to the batch's widest row, so fewer trailing
    pads are scored (our earlier reading).
    """

    def __init__(self, name: str, row_width: str = "task"):
        if name not in TASKS:
            raise ValueError(f"task must be one of {TASKS} (got {name!r})")
        if row_width not in ROW_WIDTHS:
            raise ValueError(f"row_width must be one of {ROW_WIDTHS} (got {row_width!r})")
        self.name = name
        self.row_width = row_width
        values = [str(v) for v in range(UNIQUE_SET_VALUES)] if name == "unique_set" else ["0", "1"]
        op = {"addition": ["+"], "multiplication": ["x"]}.get(name, [])
        self.vocab = values + op + ["=", "<pad>"]
        self.op = len(values) if op else None
        self.sep = self.vocab.index("=")
        self.pad = self.vocab.index("<pad>")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def n_loops(self, n: torch.Tensor, n1: torch.Tensor | None = None) -> torch.Tensor:
        """``T(n)``: ``n`` loops, ``n1 * n2`` for Multiplication (spec, from the authors' code)."""
        return n * n1 if self.name == "multiplication" else n.clone()

    def batch(
        self, lengths: torch.Tensor, generator: torch.Generator, n1: torch.Tensor | None = None
    ) -> AlgorithmicBatch:
        """Rows for samples of lengths ``n`` (``(B,)`` int64, each >= 1).

        Multiplication: ``lengths`` are ``n2``; ``n1`` is drawn from {1, 2}
        unless given (the authors test at ``n1 = 2``).
        """
        lengths = lengths.long()
        if lengths.dim() != 1 or len(lengths) == 0 or int(lengths.min()) < 1:
            raise ValueError("lengths must be a non-empty 1-D tensor of integers >= 1")
        B, n_max, device = len(lengths), int(lengths.max()), lengths.device
        live = torch.arange(n_max, device=device) < lengths[:, None]

        def rand_bits(k):
            return torch.randint(0, 2, (B, k), generator=generator, device=device)

        def one(tok):
            return (torch.full((B, 1), tok, device=device), torch.ones(B, dtype=torch.long, device=device))

        if self.name == "multiplication":
            if n1 is None:
                n1 = torch.randint(1, 3, (B,), generator=generator, device=device)
            n1 = n1.long().expand(B) if n1.dim() == 0 else n1.long()
        if self.name == "addition" and n_max > 61 or self.name == "multiplication" and n_max + int(n1.max()) > 62:
            raise ValueError(f"{self.name}: operands longer than 61 bits are not supported (got n = {n_max})")

        # the query as segments (tokens, lengths); bits past a sample's length are zeroed, so sums see only the sample
        if self.name in ("addition", "multiplication"):
            a_len = n1 if self.name == "multiplication" else lengths
            a_max = int(a_len.max())
            a = rand_bits(a_max) * (torch.arange(a_max, device=device) < a_len[:, None])
            query = [(a, a_len), one(self.op), (rand_bits(n_max) * live, lengths)]
        elif self.name == "unique_set":
            query = [(torch.randint(0, UNIQUE_SET_VALUES, (B, n_max), generator=generator, device=device), lengths)]
        else:
            query = [(rand_bits(n_max) * live, lengths)]

        answer, a_len = self._answer(query, lengths, n1)
        width = ROW_WIDTH[self.name](n_max) if self.row_width == "task" else 0
        # one column more than the rows: inputs are its first `width` tokens, targets its last
        full = _pack(query + [one(self.sep), (answer, a_len), one(self.pad)], self.pad, width + 1)
        inputs, targets = full[:, :-1].clone(), full[:, 1:].clone()
        q_len = sum(lens for _, lens in query)
        pos = torch.arange(inputs.shape[1], device=device)
        inputs[pos >= q_len[:, None] + 1] = self.pad  # answers are never visible
        mask = pos >= q_len[:, None]
        return AlgorithmicBatch(inputs, targets, mask, self.n_loops(lengths, n1), lengths)

    def _answer(self, query, lengths, n1):
        tokens, lens = query[0]
        B, device = tokens.shape[0], tokens.device
        if self.name == "parity":
            return (tokens.sum(1, keepdim=True) % 2), torch.ones(B, dtype=torch.long, device=device)
        if self.name == "copy":
            return tokens, lengths
        if self.name == "binary_sum":  # least significant bit first; a count of zero has an empty answer
            count = tokens.sum(1)
            width = max(1, int(count.max()).bit_length())
            n_bits = torch.where(count > 0, torch.floor(torch.log2(count.clamp(min=1).double())).long() + 1, 0)
            return _int_to_bits(count, width, msb_first=False), n_bits
        if self.name == "unique_set":
            i = torch.arange(tokens.shape[1], device=device)
            earlier = (i[None, :, None] > i[None, None, :]) & (i[None, None, :] < lens[:, None, None])
            seen = ((tokens[:, :, None] == tokens[:, None, :]) & earlier).any(2)
            first = ~seen & (i < lens[:, None])
            order = torch.sort(
                (~first).to(torch.int8), dim=1, stable=True
            ).indices  # first occurrences, in order, first
            return tokens.gather(1, order), first.sum(1)
        (a, a_len), _, (b, b_len) = query
        # operands are most significant bit first; a sample's bits fill the first a_len columns, so its value is
        # the whole row's read MSB first, shifted right past the zeroed columns
        va = _bits_to_int(a, msb_first=True) >> (a.shape[1] - a_len)
        vb = _bits_to_int(b, msb_first=True) >> (b.shape[1] - b_len)
        if self.name == "addition":  # the sum most significant bit first, n + 1 bits
            n = a.shape[1]  # = b.shape[1]: both operands have the sample's length
            bits = _int_to_bits(va + vb, n + 1, msb_first=True)  # (B, n + 1), leading zeros for short rows
            j = torch.arange(n + 1, device=device)
            out = bits.gather(1, (j[None, :] + (n - a_len)[:, None]).clamp(max=n))
            return out, a_len + 1
        # multiplication: the product least significant bit first, n1 + n2 bits
        return _int_to_bits(va * vb, a.shape[1] + b.shape[1], msb_first=False), a_len + b_len

    def test_batch(
        self, n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> AlgorithmicBatch:
        """``size`` rows of length exactly ``n`` (Multiplication: ``n2 = n``, ``n1 = 2``)."""
        lengths = torch.full((size,), n, dtype=torch.long, device=device)
        n1 = torch.full((size,), 2, dtype=torch.long, device=device) if self.name == "multiplication" else None
        return self.batch(lengths, generator, n1)

    def width(self, n: int) -> int:
        """Row width at largest length ``n`` under ``row_width="task"`` (:data:`ROW_WIDTH`)."""
        return ROW_WIDTH[self.name](n)


@dataclass
class Curriculum:
    """The length curriculum (spec): the maximum length starts at ``start`` and
    grows by one every ``interval`` steps up to ``max_len + 1``; each sample's
    length is uniform on ``1 .. current maximum - 1``."""

    max_len: int
    interval: int
    start: int = 2

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.interval < 1 or self.start < 2:
            raise ValueError(
                f"curriculum needs max_len >= 1, interval >= 1, start >= 2 (got {self.max_len}, {self.interval}, "
                f"{self.start})"
            )

    def current_max(self, step: int) -> int:
        return min(self.start + step // self.interval, self.max_len + 1)

    @property
    def end_step(self) -> int:
        """The first step at which every training length is in use."""
        return max(0, (self.max_len + 1 - self.start) * self.interval)

    def lengths(
        self, step: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return torch.randint(1, self.current_max(step), (size,), generator=generator, device=device)
