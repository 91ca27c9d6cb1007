"""The algorithmic report's verdict rules on hand-made results."""

import pytest

from loopscape.reporting.algorithmic import (
    beyond,
    seeds_markdown,
    seeds_summary,
    seeds_verdicts,
    verdicts,
)
from loopscape.reporting.hessian import coupling_seeds_table


def results(single, looped, shift, test_lengths=(1, 2, 3, 4), saving=None):
    def acc(a):
        return {"adaptive": a, "adaptive_per_sample": a, "oracle": [1.0] * len(a), "chosen_loops": [1.0] * len(a)}

    return {
        "task": "parity",
        "config": {"train_max_len": 2},
        "test_lengths": list(test_lengths),
        "paradigms": {
            "single": {"length_accuracy": {"single": single}},
            "looped": {"length_accuracy": acc(looped)},
            "shift": {"length_accuracy": acc(shift)},
        },
        "shift_saving": saving or {"shift_step": 10, "time_ratio": 1.3, "flops_ratio": 1.4},
    }


def test_mean_past_the_training_length_by_hand():
    r = results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7])
    assert beyond(r, "single") == 30.0 and beyond(r, "looped") == 80.0 and beyond(r, "looped", "oracle") == 100.0


def test_one_run_judges_nothing_its_verdicts_are_over_seeds():
    def by_claim(r):
        return {v["claim"].split(": ", 1)[1]: (v["verdict"], v["ours"]) for v in verdicts(r)}

    v = by_claim(results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7]))  # +50 pts on one seed
    assert {w for w, _ in v.values()} == {"not tested"}
    assert v["Looped-Attn generalises past the training length, Single-Attn does not"][1].startswith("80.0% vs 30.0%")
    assert all("one seed" in ours for _, ours in v.values())
    v = by_claim(results([1, 1, 0.5, 0.5], [1, 1, 0.6, 0.5], [1, 1, 0.2, 0.2], saving={"shift_step": None}))
    assert v["SHIFT ends comparable to Looped-Attn"][1].startswith("SCP never fired")
    rows = verdicts(results([1, 1], [1, 1], [1, 1], test_lengths=(1, 2), saving={"shift_step": None}))
    assert [row["ours"] for row in rows] == [
        "no test length past the training lengths (1..2)",
        "no test length past the training lengths",
        "SCP never fired: the SHIFT run is Single-Attn throughout, no SHIFT to judge",
    ]


def test_summary_over_seeds_by_hand():
    runs = {
        0: results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7]),  # single 30, looped 80: edge +50
        1: results([1, 1, 0.5, 0.5], [1, 1, 0.6, 0.5], [1, 1, 0.5, 0.5]),  # 50 vs 55: +5
        2: results(
            [1, 1, 1, 1], [1, 1, 0.5, 0.5], [1, 1, 1, 1], saving={"shift_step": None}
        ),  # 100 vs 50: -50; SCP never fired
    }
    s = seeds_summary(runs)
    assert [r["seed"] for r in s["seeds"]] == [0, 1, 2] and [r["edge"] for r in s["seeds"]] == pytest.approx(
        [50, 5, -50]
    )
    over = s["over_seeds"]
    assert (
        over["single"]["mean"] == pytest.approx(60.0)
        and over["looped_oracle"]["mean"] == 100.0
        and over["looped_oracle"]["sd"] == 0.0
    )
    assert over["edge"]["mean"] == pytest.approx(5 / 3) and over["edge"]["sd"] == pytest.approx((5016.6667 / 2) ** 0.5)
    assert over["edge"]["se"] == pytest.approx(over["edge"]["sd"] / 3**0.5)
    assert "time_ratio" not in over  # one seed never switched: no ratio for it, so no mean
    assert s["edge_verdict"]["verdict"] == "direction only" and s["seeds_with_edge"] == 2
    assert s["seeds_shift_faster"] == 2
    v = {x["claim"]: x["verdict"] for x in seeds_verdicts(s)}
    assert v == {  # SHIFT: two switched seeds, FLOPs ratio 1.4 on both (no spread: significant); 5 and 0 pts behind
        "parity: Looped-Attn generalises past the training length, Single-Attn does not (3 seeds)": "direction only",
        "parity: SHIFT trains faster than Looped-Attn, at no loss (3 seeds)": "inconclusive",
    }
    assert s["shift_minus_looped_switched"]["mean"] == pytest.approx(-5.0)  # seeds 0 and 1; seed 2 never switched
    table = seeds_markdown(s).splitlines()
    assert (
        len(table) == 2 + 3 + 1
        and "| 2 |" in table[4]
        and "never" in table[4]
        and table[-1].startswith("| mean (sd) | 60.0% (36.1) | 61.7% (16.1) | 100.0% (0.0)")
    )  # sd of 30, 50, 100: sqrt(2600 / 2)


def test_a_speed_verdict_needs_seeds_and_no_loss():
    def saving(ratio):
        return {"shift_step": 10, "time_ratio": 1.04, "flops_ratio": ratio}

    def runs(shift_tail, ratios=(1.1, 1.12, 1.09)):
        return {
            k: results([1, 1, 0.5, 0.5], [1, 1, 0.9, 0.9], [1, 1, 0.9, t], saving=saving(r))
            for k, (t, r) in enumerate(zip(shift_tail, ratios))
        }

    behind = seeds_verdicts(seeds_summary(runs([0.65, 0.66, 0.64])))[-1]  # faster, but 12.5 pts below
    assert behind["verdict"] == "contradicted" and "no loss contradicted" in behind["ours"]
    level = seeds_verdicts(seeds_summary(runs([0.9, 0.89, 0.91])))[-1]
    assert level["verdict"] == "reproduced" and level["test"]["null_rate"] <= 0.05
    slower = seeds_verdicts(seeds_summary(runs([0.9, 0.89, 0.91], ratios=(0.8, 0.82, 0.79))))[-1]
    assert slower["verdict"] == "contradicted" and "speed-up contradicted" in slower["ours"]
    one = {0: runs([0.9, 0.89, 0.91])[0]}
    assert seeds_verdicts(seeds_summary(one))[-1]["verdict"] == "not tested"


def test_the_loop_split_over_seeds_holds_or_fails_only_where_every_seed_agrees():
    def coupled(full, diag, full_kappa, diag_kappa):
        r = results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7])
        r["paradigms"]["looped"]["loop_coupling"] = {
            "n_loops": 10,
            "params": 1056,
            "cross_share_trace": 0.3,
            "cross_share_top": 0.9,
            "full_kappa": full_kappa,
            "full_shape": full,
            "diagonal_kappa": diag_kappa,
            "diagonal_shape": diag,
            "top": {"full": [1.0]},
            "trace": {"full": 1.0},
        }
        return r

    fails = {0: coupled("V", "V", 235, 224), 1: coupled("V", "V", 981, 930), 2: coupled("U", "U", 5, 5)}
    s = seeds_summary(fails)
    assert [r["verdict"] for r in s["loop_coupling"]["looped"]["seeds"]] == ["fails"] * 3
    assert s["loop_coupling"]["looped"]["verdict"] == "fails" and "shift" not in s["loop_coupling"]
    row = [v for v in seeds_verdicts(s) if "cross-loop coupling" in v["claim"]]
    assert len(row) == 1 and row[0]["verdict"] == "fails" and row[0]["claim"].endswith("(3 seeds)")
    assert "seed 1: full V (kappa 981), diagonal V (kappa 930)" in row[0]["ours"]
    mixed = {**fails, 2: coupled("V", "U", 500, 3)}  # holds on seed 2 only
    m = seeds_summary(mixed)
    assert [r["verdict"] for r in m["loop_coupling"]["looped"]["seeds"]] == ["fails", "fails", "holds"]
    assert m["loop_coupling"]["looped"]["verdict"] == "partly"
    every = {k: coupled("V", "U", 500, 3) for k in range(3)}
    assert seeds_summary(every)["loop_coupling"]["looped"]["verdict"] == "holds"
    table = coupling_seeds_table({"Looped-Attn": m["loop_coupling"]["looped"]}).splitlines()
    assert len(table) == 2 + 3 + 1 and table[-1].endswith("| **partly** |") and "| 500, V | 3, U | holds |" in table[4]
    assert "loop_coupling" not in seeds_summary({k: results([1, 1], [1, 1], [1, 1]) for k in range(2)})


def test_a_one_paradigm_report_says_why_each_claim_is_not_tested():
    r = results([1, 1, 0.5, 0.1], [1, 1, 0.9, 0.7], [1, 1, 0.8, 0.7])
    r["paradigms"] = {"looped": r["paradigms"]["looped"]}
    r.pop("shift_saving")
    rows = verdicts(r)
    assert len(rows) == 3 and all(x["verdict"] == "not tested" for x in rows)
    assert rows[0]["ours"] == "this run trained Looped-Attn only; the claim needs Single-Attn too"
