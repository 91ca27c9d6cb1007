"""The loop sweep on a tiny loopified Llama saved offline (nothing is downloaded)."""

import json

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
    assert full["threshold"] == 0 and full["histogram"] == {"4": 12 * 32}  # 12 windows of 32 tokens
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
