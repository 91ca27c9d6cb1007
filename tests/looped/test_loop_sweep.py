"""The loop sweep on a tiny loopified Llama saved offline (nothing is downloaded)."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, build  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from loopscape.cli import app  # noqa: E402
from loopscape.looped.decoder import looped_layers, loopify  # noqa: E402
from loopscape.looped.sweep import loop_sweep, overthinking  # noqa: E402

runner = CliRunner()


def test_the_sweep_reads_every_count_and_agrees_with_itself(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 4), n_loops=2)  # nothing after the range
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, V, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"input_ids": ids[i : i + 50]}) for i in range(0, 400, 50))
    )
    r = runner.invoke(
        app,
        [
            "loop-sweep",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path / "data.jsonl"),
            "--loops",
            "1-4",
            "--thresholds",
            "0,1e-3,1e9",
            "--context",
            "32",
            "--exit-loops",
            "4",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Report:" in r.output and (tmp_path / "out" / "report.html").exists()
    s = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [c["n_loops"] for c in s["counts"]] == [1, 2, 3, 4] and s["trained_n_loops"] == 2
    step = [b["flops_per_token"] - a["flops_per_token"] for a, b in zip(s["counts"], s["counts"][1:])]
    in_range = sum(p.numel() for layer in model.model.layers[1:4] for p in layer.parameters())
    assert step == [2.0 * in_range] * 3  # each loop adds the looped layers' multiply-adds once
    # the range ends at the last layer: the lens at loop t is the model run at t loops
    for lens, count in zip(s["logit_lens"], s["counts"]):
        assert lens["perplexity"] == pytest.approx(count["perplexity"], rel=1e-9)
    assert len(s["convergence"]) == 3 and all(c > 0 for c in s["convergence"])
    full = s["exits"][0]
    # 12 windows of 32 tokens, 31 of them scored (the last one's output predicts nothing in the window)
    assert full["threshold"] == 0 and full["histogram"] == {"4": 12 * 31} and s["exit_loops"] == 4
    assert full["perplexity"] == pytest.approx(s["counts"][-1]["perplexity"], rel=1e-12)
    assert 2 <= s["exits"][1]["mean_loops"] <= 4
    # a threshold no criterion stays above: every token leaves at the first loop it may (the second)
    assert s["exits"][2]["histogram"] == {"2": 12 * 31} and s["exits"][2]["mean_loops"] == 2.0
    assert s["windows_read"] == 12 and s["windows_total"] == 12


def test_overthinking_rule():
    rows = lambda ppl: [{"n_loops": k + 1, "perplexity": p} for k, p in enumerate(ppl)]  # noqa: E731
    assert overthinking(rows([5.0, 3.0, 3.5])) == (2, True)
    assert overthinking(rows([5.0, 3.0, 3.02])) == (2, False)  # within 1%
    assert overthinking(rows([5.0, 3.0, 2.9])) == (3, False)


def test_bad_sweep_inputs_are_one_line(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "plain")
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": list(range(1, 39))}))
    base = ["loop-sweep", "--model", str(tmp_path / "plain"), "--data", str(tmp_path / "d.jsonl"), "--context", "8"]
    for extra, message in [
        ([], "is not loopified: give --layers START,STOP"),
        (["--loops", "x"], "--loops must be comma-separated integers or ranges like 1-16 (got 'x')"),
        (
            ["--layers", "1,2", "--exit", "halt", "--thresholds", "1"],
            "--exit must be one of ('kl', 'entropy', 'state')",
        ),
    ]:
        r = runner.invoke(app, [*base, *extra, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    with pytest.raises(ValueError, match="has nothing to loop"):
        loop_sweep(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], [1])


def test_labelled_rows_are_scored_on_their_labels_and_by_exact_match(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=2)
    g = torch.Generator().manual_seed(1)
    rows = []
    for width in (6, 6, 6, 9, 9):  # two lengths: batched by length, no padding
        ids = torch.randint(1, V, (width,), generator=g).tolist()
        labels = [-100] * (width - 2) + ids[-2:]  # the last two tokens are the answer
        rows.append({"input_ids": ids, "labels": labels})
    # a row whose answer is exactly what the model predicts at 3 loops: exact match there is at least 1/6
    x = torch.tensor([rows[0]["input_ids"][:4]])
    model.model.looped_range.n_loops = 3
    with torch.no_grad():
        for _ in range(2):
            x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], 1)
    model.model.looped_range.n_loops = 2
    rows.append({"input_ids": x[0].tolist(), "labels": [-100] * 4 + x[0, 4:].tolist()})
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["loop-sweep", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "rows.jsonl")]
    r = runner.invoke(app, [*args, "--loops", "1-3", "--thresholds", "0", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "sweep.json").read_text())
    for count in s["counts"]:  # by hand: each row alone, its two answer tokens
        model.model.looped_range.n_loops = count["n_loops"]
        hits, rights, nll = 0, 0, 0.0
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor([row["input_ids"]])
                logp = model(input_ids=ids).logits[0, -3:-1].double().log_softmax(-1)
                answer = ids[0, -2:]
                hit = logp.argmax(-1) == answer
                hits, rights = hits + int(hit.sum()), rights + int(hit.all())
                nll -= logp.gather(-1, answer[:, None]).sum().item()
        assert count["tokens"] == 2 * len(rows)
        assert count["accuracy"] == hits / (2 * len(rows))
        assert count["exact_match"] == rights / len(rows)
        assert count["perplexity"] == pytest.approx(math.exp(nll / (2 * len(rows))), rel=1e-9)
    assert s["counts"][2]["exact_match"] >= 1 / len(rows)
    assert s["exits"][0]["histogram"] == {"2": 2 * len(rows)}  # the answers' tokens only, at the saved 2 loops
    assert s["exits"][0]["exact_match"] == s["counts"][1]["exact_match"]
    assert "exact match" in r.output
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3], "labels": [1, 2]}) + "\n")
    r = runner.invoke(app, [*args[:-1], str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "bad.jsonl line 1: labels must be as long as input_ids" in r.output, r.output


def test_the_sweep_reads_a_looped_gpt_of_an_algorithmic_run(tmp_path):
    import yaml

    from loopscape.config import to_dict
    from loopscape.experiments.algorithmic import AlgorithmicStudyConfig, build
    from loopscape.models.looped_gpt import attention_flops, flops_per_token_step
    from loopscape.training.checkpoint import save_weights

    config = AlgorithmicStudyConfig(task="parity", test_lengths=[2, 5], test_size=16)
    task, model = build(config, torch.device("cpu"))
    (tmp_path / "run" / "looped").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    save_weights(tmp_path / "run" / "looped" / "model.safetensors", model)
    r = runner.invoke(
        app, ["loop-sweep", "--model", str(tmp_path / "run" / "looped"), "--loops", "1-3", "-o", str(tmp_path / "out")]
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [c["n_loops"] for c in s["counts"]] == [1, 2, 3] and (
        tmp_path / "out" / "figures" / "per_length.png"
    ).exists()
    with torch.no_grad():
        for n in (2, 5):  # by hand: the model run at k loops on the study's own test rows of length n
            b = task.test_batch(n, 16, torch.Generator().manual_seed(config.seed * 1000 + n))
            hand = [
                ((model(b.inputs, k).argmax(-1) == b.targets) | ~b.mask).all(-1).float().mean().item()
                for k in (1, 2, 3)
            ]
            assert s["per_length"][str(n)]["exact_match"] == pytest.approx(hand, abs=1e-12)
            assert s["per_length"][str(n)]["T"] == int(b.n_loops.max())
            assert s["per_length"][str(n)]["best"] == 1 + hand.index(max(hand))
    # one FLOP count for every looped model: 2 x (the loop's weights per token + the read-out), the
    # attention's context-length term beside it at the widest row
    head = sum(p.numel() for p in model.head.parameters())
    assert [c["flops_per_token"] for c in s["counts"]] == [2.0 * (model.weights_per_token(k) + head) for k in (1, 2, 3)]
    attention = attention_flops(model.config, task.width(5))
    assert [c["attention_flops_per_token"] for c in s["counts"]] == [k * attention for k in (1, 2, 3)]
    assert flops_per_token_step(model.config, task.width(5)) == 2.0 * model.weights_per_token(1) + attention
    assert len(s["convergence"]) == 2 and all(c > 0 for c in s["convergence"])
    r = runner.invoke(app, ["loop-sweep", "--model", str(tmp_path / "run"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "must be a Hugging Face save_pretrained folder or a paradigm folder" in r.output


def test_exits_at_one_loop_read_one_loop_per_token(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=2)
    batches = [{"input_ids": torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(0))}]
    s = loop_sweep(model, batches, [1, 2], thresholds=[0.0], exit_loops=1)
    assert s["exits"][0]["histogram"] == {1: 10} and s["exits"][0]["mean_loops"] == 1.0


@pytest.mark.parametrize("arm", ["shift-lora", "shift-concat"])
def test_the_sweep_reads_a_checkpoints_own_loop_weights_not_fresh_ones(arm, tmp_path):
    """A retrofit arm's saved LoRA / concat adapter are what the sweep measures: its perplexity at the saved
    count is the loaded model's own, and differs from the same layers with fresh loop weights."""
    settings = {"loop_lora": 2} if arm == "shift-lora" else {"injection": "concat"}
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, **settings)
    with torch.no_grad():
        for p in looped_layers(model).loop_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids}]
    trained = loop_sweep(model, batches, [3])["counts"][0]["perplexity"]
    fresh = loop_sweep(loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, **settings), batches, [3])
    assert fresh["counts"][0]["perplexity"] != pytest.approx(trained, rel=1e-6)
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": ids.flatten().tolist()}))
    r = runner.invoke(
        app,
        ["loop-sweep", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--context", "12",
         "--loops", "3", "-o", str(tmp_path / "out")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    swept = json.loads((tmp_path / "out" / "sweep.json").read_text())["counts"][0]["perplexity"]
    assert swept == pytest.approx(trained, rel=1e-9)


def test_a_linear_attention_toy_goes_through_the_same_sweep():
    """Looped-Attn (the paper's toy) through the one sweep, scored on its targets: each count equals the
    model run at that count by hand, the lens equals the counts (its readout is W_h z_t), FLOPs grow by the
    loop's 3 d^2 weights per loop."""
    from loopscape.looped.sweep import Masked
    from loopscape.models.linear_attn import looped_attn

    toy = looped_attn(n_loops=3, vocab_size=3, max_len=4).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 3, (16, 4), generator=g), torch.randint(0, 3, (16,), generator=g)
    s = loop_sweep(toy, [{"inputs": x, "targets": y[:, None], "mask": torch.ones(16, 1, dtype=torch.bool)}], [1, 2, 5],
                   scorer=Masked())  # fmt: skip
    assert toy.n_loops == 3 and s["trained_n_loops"] == 3  # restored: the sweep ran it at 1, 2 and 5
    for row in s["counts"]:
        toy.n_loops = row["n_loops"]
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(toy(x), y, reduction="mean").item()
        assert row["perplexity"] == pytest.approx(math.exp(nll), rel=1e-10)
    toy.n_loops = 3
    assert [r["perplexity"] for r in s["logit_lens"]][:2] == pytest.approx([r["perplexity"] for r in s["counts"]][:2])
    d = toy.config.d
    assert s["counts"][1]["flops_per_token"] - s["counts"][0]["flops_per_token"] == 2.0 * 3 * d * d
    with pytest.raises(ValueError, match=r"^thresholds must be empty: LinearAttn has no per-token exit"):
        loop_sweep(toy, [{"inputs": x, "targets": y[:, None], "mask": torch.ones(16, 1, dtype=torch.bool)}], [1],
                   thresholds=[0.1], scorer=Masked())  # fmt: skip


def test_the_window_cap_is_a_flag_and_the_report_says_how_much_was_read(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=2)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, V, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": ids}))
    base = ["loop-sweep", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--context", "16"]
    r = runner.invoke(app, [*base, "--loops", "2", "--max-windows", "5", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert (s["windows_read"], s["windows_total"]) == (5, 12) and s["counts"][0]["tokens"] == 5 * 15
    assert "read 5 of the data's 12 windows" in r.output
    assert "Read 5 of the data&#x27;s 12 windows" in (tmp_path / "out" / "report.html").read_text() or (
        "Read 5 of the data's 12 windows" in (tmp_path / "out" / "report.html").read_text()
    )
    r = runner.invoke(app, [*base, "--max-windows", "0", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--max-windows must be an integer >= 1 (got 0)" in r.output
