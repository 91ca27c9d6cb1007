"""The lm-eval model type: a local task file, a tiny Llama and a word-level tokenizer saved offline."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import loopscape  # noqa: E402
from loopscape.integrations import lmeval  # noqa: E402
from loopscape.looped.decoder import looped_layers  # noqa: E402
from tests.hf_families import V, build  # noqa: E402

WORDS = ["<pad>", "<unk>", "<eos>", "Q:", "A:"] + [f"w{i}" for i in range(V - 5)]
TASK = """task: loop_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        words = [f"w{int(j)}" for j in torch.randint(0, V - 5, (5,), generator=g)]
        rows.append({"question": " ".join(words[:3]), "choices": words[3:], "answer": i % 2})
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "loop_toy.yaml").write_text(TASK.format(data=data))
    plain = build("llama", n_layer=4)
    plain.save_pretrained(root / "plain")
    looped = loopscape.loopify(build("llama", n_layer=4), layers=(1, 3), n_loops=3)
    looped.save_pretrained(root / "looped")
    for name in ("plain", "looped"):
        _tokenizer().save_pretrained(root / name)
    return root, rows


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _loglikelihoods(setting, model, **model_args):
    root, _ = setting
    out = lm_eval.simple_evaluate(
        model=model,
        model_args={"device": "cpu", "dtype": "float32", **model_args},
        tasks=["loop_toy"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"]["loop_toy"], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64), out


def _direct(model, rows):
    """The same log-likelihoods computed by hand: sum of log p(choice | 'Q: question A:')."""
    tok, lls = _tokenizer(), []
    for row in rows:
        context = tok(f"Q: {row['question']} A:")["input_ids"]
        row_lls = []
        for choice in row["choices"]:
            ids = torch.tensor([context + tok(choice)["input_ids"]])
            logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            row_lls.append(logp.gather(-1, ids[0, 1:, None])[len(context) - 1 :].sum().item())
        lls.append(row_lls)
    return torch.tensor(lls, dtype=torch.float64)


def test_lm_eval_runs_a_loopified_checkpoint_at_any_loop_count(setting):
    root, rows = setting
    at_saved, out = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"))
    model = loopscape.from_pretrained(root / "looped").eval()
    with torch.no_grad():
        assert torch.allclose(at_saved, _direct(model, rows), atol=1e-4)
        loopscape.set_n_loops(model, 5)
        at_five, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"), n_loops=5)
        assert torch.allclose(at_five, _direct(model, rows), atol=1e-4)
    assert (at_five - at_saved).abs().max() > 1e-3  # the loop count reaches the model
    assert 0.0 <= out["results"]["loop_toy"]["acc,none"] <= 1.0
    # one loop is the original decoder, which lm-eval's own hf model reads from the unlooped checkpoint
    at_one, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"), n_loops=1)
    original, _ = _loglikelihoods(setting, "hf", pretrained=str(root / "plain"))
    assert torch.allclose(at_one, original, atol=1e-4)


def test_a_plain_checkpoint_is_looped_by_layers_and_exit_is_a_model_arg(setting):
    root, rows = setting
    plain_looped, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "plain"), layers="1:3", n_loops=3)
    saved, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"))
    assert torch.allclose(plain_looped, saved, atol=1e-6)
    # a threshold of 0 is full depth exactly; a huge one stops every token after min_loops = 2 loops
    full, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"), exit="state", exit_threshold=0.0)
    assert torch.equal(full, saved)
    early, _ = _loglikelihoods(
        setting, "loopscape", pretrained=str(root / "looped"), exit="state", exit_threshold=1e9, min_loops=2
    )
    at_two, _ = _loglikelihoods(setting, "loopscape", pretrained=str(root / "looped"), n_loops=2)
    assert torch.allclose(early, at_two, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"exit": "maybe"}, "exit must be one of none, kl, entropy, state (got 'maybe')"),
        ({"layers": "2"}, "layers must be 'start:stop' decoder layer indices, e.g. layers=2:4 (got '2')"),
        ({"n_loops": 0}, "n_loops must be an integer >= 1 (got 0)"),
    ],
)
def test_bad_model_args_are_one_line(setting, args, message):
    root, _ = setting
    with pytest.raises(ValueError) as error:
        lmeval.LoopscapeLM(pretrained=str(root / "looped"), device="cpu", **args)
    assert str(error.value) == message


def test_a_plain_checkpoint_without_layers_is_refused(setting):
    root, _ = setting
    with pytest.raises(ValueError, match=r"^layers must be given as 'start:stop'"):
        lmeval.LoopscapeLM(pretrained=str(root / "plain"), device="cpu")


def test_the_command_line_knows_the_loopscape_model(setting, tmp_path):
    root, _ = setting
    cmd = [sys.executable, "-m", "loopscape.cli", "lm-eval", "--model", "loopscape", "--device", "cpu"]
    cmd += ["--model_args", f"pretrained={root / 'looped'},n_loops=2", "--tasks", "loop_toy"]
    cmd += ["--include_path", str(root / "tasks"), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = next((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(results.read_text())["results"]["loop_toy"]


def test_lm_eval_scores_a_trained_concat_adapter_not_a_fresh_one(setting, tmp_path):
    root, rows = setting
    model = loopscape.loopify(build("llama", n_layer=4), layers=(1, 3), n_loops=3, injection="concat")
    adapter = looped_layers(model).adapter
    with torch.no_grad():
        adapter.weight.mul_(0.5)  # trained away from [I I]
    model.save_pretrained(tmp_path / "concat")
    _tokenizer().save_pretrained(tmp_path / "concat")
    scored, _ = _loglikelihoods(setting, "loopscape", pretrained=str(tmp_path / "concat"))
    with torch.no_grad():
        assert torch.allclose(scored, _direct(loopscape.from_pretrained(tmp_path / "concat").eval(), rows), atol=1e-4)
        fresh = loopscape.loopify(build("llama", n_layer=4), layers=(1, 3), n_loops=3, injection="concat").eval()
        assert (scored - _direct(fresh, rows)).abs().max() > 1e-3
