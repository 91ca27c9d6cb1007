"""The loop sweep on a tiny loopified Llama saved offline (nothing is downloaded)."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, build  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from loopscape.cli import app  # noqa: E402
from loopscape.integrations.loop_sweep import loop_sweep, overthinking  # noqa: E402
from loopscape.integrations.loopify import loopify  # noqa: E402

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
            "0,1e-3",
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
    assert s["exits"][1]["mean_loops"] <= 4


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
    with pytest.raises(ValueError, match="must be loopified"):
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
    from loopscape.models.looped_gpt import flops_per_token_step
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
    step = flops_per_token_step(model.config, task.width(5))
    assert [c["flops_per_token"] for c in s["counts"]] == pytest.approx([step, 2 * step, 3 * step])
    assert len(s["convergence"]) == 2 and all(c > 0 for c in s["convergence"])
    r = runner.invoke(app, ["loop-sweep", "--model", str(tmp_path / "run"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "must be a Hugging Face save_pretrained folder or a paradigm folder" in r.output


def test_exits_at_one_loop_read_one_loop_per_token(tmp_path):
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=2)
    batches = [{"input_ids": torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(0))}]
    s = loop_sweep(model, batches, [1, 2], thresholds=[0.0], exit_loops=1)
    assert s["exits"][0]["histogram"] == {1: 10} and s["exits"][0]["mean_loops"] == 1.0
