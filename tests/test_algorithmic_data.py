"""The algorithmic tasks against plain-Python references, on random rows and hand-written ones."""

import pytest
import torch

from loopscape.data.algorithmic import TASKS, AlgorithmicTask, Curriculum


def reference_answer(task: str, query: list[str]) -> list[str]:
    """The answer from the query's text, the slow obvious way."""
    if task == "parity":
        return [str(query.count("1") % 2)]
    if task == "copy":
        return list(query)
    if task == "binary_sum":  # least significant bit first; zero ones: an empty answer
        return list(bin(query.count("1"))[2:][::-1]) if "1" in query else []
    if task == "unique_set":
        seen = []
        for v in query:
            if v not in seen:
                seen.append(v)
        return seen
    if task == "addition":
        i = query.index("+")
        a, b = query[:i], query[i + 1 :]
        assert len(a) == len(b)
        return list(format(int("".join(a), 2) + int("".join(b), 2), f"0{len(a) + 1}b"))  # most significant first
    i = query.index("x")  # multiplication: operands most significant bit first, the product least significant first
    a, b = query[:i], query[i + 1 :]
    product = int("".join(a), 2) * int("".join(b), 2)
    return list(format(product, f"0{len(a) + len(b)}b")[::-1])


WIDTH = {  # the authors' row width at the batch's largest length n (spec's table)
    "parity": lambda n: n + 2,
    "copy": lambda n: 2 * n + 2,
    "addition": lambda n: 3 * n + 3,
    "binary_sum": lambda n: n + 8,
    "unique_set": lambda n: 2 * n + 2,
    "multiplication": lambda n: 4 * n + 4,
}


def reference_row(task: AlgorithmicTask, query: list[str], width: int) -> tuple[list[int], list[int], list[bool]]:
    """(inputs, targets, mask) of one row, written out from the layout: the query, `=`, pads; the
    target at the separator is the first answer token, then the rest of the answer, then pads."""
    ids = [task.vocab.index(t) for t in query]
    answer = [task.vocab.index(t) for t in reference_answer(task.name, query)]
    sep = len(ids)
    inputs = ids + [task.sep] + [task.pad] * (width - sep - 1)
    targets = ids[1:] + [task.sep] + answer + [task.pad] * (width - sep - len(answer))
    return inputs, targets, [p >= sep for p in range(width)]


def parse(task: AlgorithmicTask, batch, i: int):
    """(query, answer) of row i as token strings, read from the row itself."""
    inputs, targets, mask = batch.inputs[i].tolist(), batch.targets[i].tolist(), batch.mask[i].tolist()
    sep = inputs.index(task.sep)
    assert mask == [p >= sep for p in range(len(mask))]  # scored from the separator to the end
    assert all(t == task.pad for t in inputs[sep + 1 :])  # the answer is never visible
    answer = []
    for t in targets[sep:]:
        if t == task.pad:
            break
        answer.append(task.vocab[t])
    assert all(t == task.pad for t in targets[sep + len(answer) :])  # end of sequence, then pads
    return [task.vocab[t] for t in inputs[:sep]], answer


@pytest.mark.parametrize("name", TASKS)
def test_random_rows_match_the_reference(name):
    task = AlgorithmicTask(name)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 16, (300,), generator=g)
    batch = task.batch(lengths, g)
    width = WIDTH[name](int(lengths.max()))
    assert batch.inputs.shape == batch.targets.shape == (300, width)  # the task's fixed width, not the widest row
    for i in range(len(lengths)):
        query, answer = parse(task, batch, i)
        assert answer == reference_answer(name, query), (name, query, answer)
        row = (batch.inputs[i].tolist(), batch.targets[i].tolist(), batch.mask[i].tolist())
        assert row == reference_row(task, query, width), (name, query)
        n = int(lengths[i])
        if name in ("addition", "multiplication"):
            op = "+" if name == "addition" else "x"
            assert len(query[query.index(op) + 1 :]) == n
        else:
            assert len(query) == n
        n1 = query.index("x") if name == "multiplication" else 1
        assert int(batch.n_loops[i]) == n * n1  # T(n) = n, T(n1, n2) = n1 * n2


@pytest.mark.parametrize(
    "name, query, answer",
    [
        ("parity", "1101", "1"),
        ("parity", "0", "0"),
        ("copy", "0110", "0110"),
        ("addition", "011+011", "0110"),  # 3 + 3 = 6, n + 1 bits, MSB first
        ("addition", "1+1", "10"),
        ("binary_sum", "11101", "001"),  # four ones: 4 = 100b, LSB first
        ("binary_sum", "000", ""),  # no ones: the answer is empty (the separator already predicts the pad)
        ("multiplication", "11x101", "11110"),  # 3 * 5 = 15 = 01111b, LSB first, n1 + n2 bits
        ("multiplication", "10x110", "00110"),  # 2 * 6 = 12 = 01100b: operands MSB first, product LSB first
    ],
)
def test_reference_on_hand_written_examples(name, query, answer):
    """The reference the library is checked against, checked by hand."""
    assert "".join(reference_answer(name, list(query))) == answer


def test_hand_written_unique_set():
    assert reference_answer("unique_set", ["7", "3", "7", "9", "3"]) == ["7", "3", "9"]


def test_batch_layout_by_hand():
    """Parity, n = 3: input `b b b = .`, target `. . . p .` scored from the separator."""
    task = AlgorithmicTask("parity")
    batch = task.batch(torch.tensor([3]), torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (1, 5)
    assert batch.inputs[0, 3] == task.sep and batch.inputs[0, 4] == task.pad
    assert batch.mask[0].tolist() == [False, False, False, True, True]
    assert batch.targets[0, 4] == task.pad
    assert batch.targets[0, 3] == batch.inputs[0, :3].sum() % 2


def test_rows_of_one_batch_are_right_padded_and_deterministic():
    task = AlgorithmicTask("copy")
    a = task.batch(torch.tensor([1, 6]), torch.Generator().manual_seed(5))
    b = task.batch(torch.tensor([1, 6]), torch.Generator().manual_seed(5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert a.inputs.shape[1] == 2 * (6 + 1)  # the authors' width: the longest row and one more pad
    assert a.mask[0].sum() == a.inputs.shape[1] - 1  # short row: scored from its separator to the end
    assert a.mask[1].sum() == 6 + 2  # six answer bits and two trailing pads


def test_batch_row_width_is_the_widest_row():
    """The earlier reading: rows as wide as the batch's widest, one end-of-sequence pad."""
    a = AlgorithmicTask("copy", row_width="batch").batch(torch.tensor([1, 6]), torch.Generator().manual_seed(5))
    b = AlgorithmicTask("copy").batch(torch.tensor([1, 6]), torch.Generator().manual_seed(5))
    assert a.inputs.shape[1] == 6 + 1 + 6
    assert torch.equal(a.inputs, b.inputs[:, :-1]) and torch.equal(a.targets, b.targets[:, :-1])


def test_binary_sum_of_no_ones_predicts_the_pad_at_the_separator():
    task = AlgorithmicTask("binary_sum")
    g = torch.Generator().manual_seed(0)
    batch = task.batch(torch.ones(64, dtype=torch.long), g)  # one bit: half the rows hold no one
    zero = batch.inputs[:, 0] == 0
    assert zero.any() and (~zero).any()
    assert (batch.targets[zero, 1] == task.pad).all()  # position 1 is the separator
    assert (batch.targets[~zero, 1] == 1).all() and batch.inputs.shape[1] == 1 + 8


def test_test_batch_has_one_length_and_multiplication_tests_at_n1_2():
    g = torch.Generator().manual_seed(0)
    b = AlgorithmicTask("multiplication").test_batch(7, 50, g)
    assert (b.lengths == 7).all() and (b.n_loops == 14).all()


def test_curriculum():
    c = Curriculum(max_len=5, interval=10)
    assert [c.current_max(s) for s in (0, 9, 10, 35, 40, 1000)] == [2, 2, 3, 5, 6, 6]
    assert c.end_step == 40
    g = torch.Generator().manual_seed(0)
    assert (c.lengths(0, 100, g) == 1).all()  # starts at length 1 only
    late = c.lengths(10_000, 2000, g)
    assert late.min() == 1 and late.max() == 5 and abs(late.float().mean().item() - 3.0) < 0.15


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="task must be one of"):
        AlgorithmicTask("sorting")
    with pytest.raises(ValueError, match="row_width must be one of"):
        AlgorithmicTask("parity", row_width="widest")
    with pytest.raises(ValueError, match="lengths"):
        AlgorithmicTask("parity").batch(torch.tensor([0, 2]), torch.Generator())
