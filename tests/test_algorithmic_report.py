"""The algorithmic report's verdict rules on hand-made results."""

from loopscape.reporting.algorithmic import beyond, verdicts


def results(single, looped, shift, test_lengths=(1, 2, 3, 4), saving=None):
    acc = lambda a: {"adaptive": a, "adaptive_per_sample": a, "oracle": [1.0] * len(a), "chosen_steps": [1.0] * len(a)}
    return {
        "task": "parity",
        "config": {"train_max_len": 2},
        "test_lengths": list(test_lengths),
        "paradigms": {"single": {"length_accuracy": {"single": single}}, "looped": {"length_accuracy": acc(looped)}, "shift": {"length_accuracy": acc(shift)}},
        "shift_saving": saving or {"shift_step": 10, "time_ratio": 1.3, "flops_ratio": 1.4},
    }


def test_mean_past_the_training_length_by_hand():
    r = results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7])
    assert beyond(r, "single") == 30.0 and beyond(r, "looped") == 80.0 and beyond(r, "looped", "oracle") == 100.0


def test_verdict_rules():
    by_claim = lambda r: {v["claim"].split(": ", 1)[1]: v["verdict"] for v in verdicts(r)}
    v = by_claim(results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7]))  # +50 pts; SHIFT 5 pts below
    assert v == {"Looped-Attn generalises past the training length, Single-Attn does not": "reproduced",
                 "SHIFT ends comparable to Looped-Attn": "reproduced", "SHIFT trains faster than Looped-Attn": "reproduced"}
    v = by_claim(results([1, 1, 0.5, 0.5], [1, 1, 0.6, 0.5], [1, 1, 0.2, 0.2], saving={"shift_step": None}))
    assert v["Looped-Attn generalises past the training length, Single-Attn does not"] == "partly reproduced"  # +5 pts
    assert v["SHIFT ends comparable to Looped-Attn"] == "not reproduced"  # 35 pts below
    assert v["SHIFT trains faster than Looped-Attn"] == "not reproduced"  # SCP never fired
    v = by_claim(results([1, 1, 0.0, 0.0], [1, 1, 0.02, 0.0], [1, 1, 0.0, 0.0]))  # +1 pt: noise, and nothing for SHIFT to match
    assert v["Looped-Attn generalises past the training length, Single-Attn does not"] == "not reproduced"
    assert v["SHIFT ends comparable to Looped-Attn"] == "inconclusive"
    v = by_claim(results([1, 1], [1, 1], [1, 1], test_lengths=(1, 2)))
    assert v["length generalisation"] == "not tested" and "SHIFT trains faster than Looped-Attn" in v
