import html
import json

import pytest
from typer.testing import CliRunner

from loopscape.cli import app
from loopscape.config import ConfigError, load_config
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.reporting.html import VERDICTS

runner = CliRunner()
TINY = "--epochs 3 --seeds 0,1 --set data.n_train=100 --set data.n_val=50 --set workers=1 -q".split()


def test_markov_writes_run_folder_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["markov", "-o", str(out), *TINY])
    assert r.exit_code == 0, r.output
    for f in [
        "config.yaml",
        "data.json",
        "summary.md",
        "summary.json",
        "figures/fig3a_ic_distribution.png",
        "figures/fig3b_accuracy.png",
    ]:
        assert (out / f).exists(), f
    for model in ("single_attn", "looped_attn"):
        for seed in (0, 1):
            assert len((out / "runs" / model / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observation1"]["verdict"] == "not tested"  # 3 epochs: the claim is about epochs after 150
    assert "3 epochs" in summary["observation1"]["reason"] and "not tested" in r.output
    # the data facts and the headroom go into summary.json (so report.json), and beside the paper's in data.json
    lang, data = summary["language"], json.loads((out / "data.json").read_text())
    assert lang["headroom"] == data["headroom"] and lang["paper_facts"]["ic_max"] == 14.57
    h = lang["headroom"]["all"]
    assert h["headroom"] == pytest.approx(h["bayes_ceiling"] - h["bigram_rule"])
    before = (out / "summary.json").read_bytes()
    r = runner.invoke(app, ["markov", "-o", str(out), *TINY])
    assert r.exit_code == 2 and "already exists" in r.output
    assert (out / "summary.json").read_bytes() == before
    r = runner.invoke(app, ["markov", "-o", str(out), "--resume", *TINY])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.n_train=0", "data.n_train"),
        ("data.alpha=0", "data.alpha"),
        ("model.n_loops=0", "model.n_loops"),
        ("model.embedding=learned", "model.embedding"),
        ("data.test_lengths=[3]", "data.test_lengths"),
        ("train.lr=fast", "train.lr"),
        ("train.batchsize=3", "train.batchsize"),
    ],
)
def test_invalid_values_fail_with_one_clear_line(tmp_path, override, field):
    r = runner.invoke(app, ["markov", "-o", str(tmp_path / "x"), "--set", override, "-q"])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], r.output
    assert not (tmp_path / "x").exists()


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text("seeds = [3, 4]\n[train]\nepochs = 7\n")
    (tmp_path / "c.yaml").write_text("model:\n  embedding: random\n  d_model: 8\n")
    cfg = load_config(MarkovStudyConfig, tmp_path / "c.toml", {"train.batch_size": 50})
    assert cfg.seeds == [3, 4] and cfg.train.epochs == 7 and cfg.train.batch_size == 50
    cfg = load_config(MarkovStudyConfig, tmp_path / "c.yaml")
    assert cfg.model.embedding == "random" and cfg.model.d_model == 8
    with pytest.raises(ConfigError, match="model.max_len"):
        load_config(MarkovStudyConfig, None, {"data.length": 6})


def test_shipped_config_is_the_default():
    from pathlib import Path

    from loopscape.config import to_dict

    shipped = load_config(MarkovStudyConfig, Path(__file__).parents[1] / "configs" / "markov.yaml")
    assert to_dict(shipped) == to_dict(MarkovStudyConfig())


def test_sweep_collects_a_verdict_per_cell(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.embedding: [token, 'random:4']\n")
    r = runner.invoke(app, ["sweep", "-o", str(tmp_path / "sw"), "--grid", str(grid), *TINY])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    assert [row["cell"] for row in rows] == ["embeddingtoken", "random4"]


def test_theory_adds_a_section_to_a_run_report(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["markov", "-o", str(out), *TINY]).exit_code == 0
    r = runner.invoke(
        app,
        [
            "theory",
            "--report",
            str(out),
            "--set",
            "instances=5",
            "--set",
            "steps=20",
            "--seeds",
            "0",
            "--epochs",
            "2",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    text = (out / "summary.md").read_text()
    assert "## Theory" in text and "Theorem 1 (Setting 1)" in text
    assert (out / "theory" / "figures" / "river_u_v_valleys.png").exists()


def test_reproduce_quick_writes_one_html_report_and_its_numbers(tmp_path):
    out = tmp_path / "rep"
    r = runner.invoke(app, ["reproduce", "--quick", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    assert page.count("data:image/png;base64,") >= 9  # figures embedded, no external files
    assert 'src="figures' not in page and "<table>" in page
    claims = [v["claim"] for v in report["verdicts"]]
    assert any(c.startswith("Observation 1") for c in claims) and any(c.startswith("SCP") for c in claims)
    verdicts = {v["claim"].split(":")[0]: v["verdict"] for v in report["verdicts"]}
    for claim in ("Observation 1", "Observation 2", "SCP shifts at 100-150 epochs"):  # 40 epochs: too short
        assert verdicts[claim] == "not tested", claim
    assert verdicts["Theorem 1"] == "reproduced"
    for v in report["verdicts"]:
        assert v["verdict"] in VERDICTS and "test" in v
        if v["verdict"] == "reproduced":
            assert v["test"]["null_rate"] is None or v["test"]["null_rate"] <= 0.05
        assert v["ours"] and "None" not in v["ours"] and "nan" not in v["ours"]
        assert html.escape(v["claim"]) in page
    assert "Quick run" in page and "not tested" in page
    length = report["length_generalisation"]
    assert set(length) == {"4", "8", "11", "14", "17"}
    for row in length.values():  # no model beats the Bayes-optimal predictor by more than sampling noise
        assert row["looped_attn"]["all"]["mean"] <= 100 * row["bayes_all"] + 5
    assert report["shift"]["checks"]["population_vs_single_model_trainer_max_abs_diff_acc_all"] <= 0.01
    # a second run with --resume rebuilds the report from what is there
    r = runner.invoke(app, ["reproduce", "--quick", "-o", str(out), "--resume", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["verdicts"] == report["verdicts"]


def test_reproduce_rejects_bad_settings_by_name(tmp_path):
    r = runner.invoke(app, ["reproduce", "--quick", "-o", str(tmp_path / "x"), "--set", "shift.optimizer=sgd"])
    assert r.exit_code == 2 and "shift.optimizer" in r.output and "keep" in r.output


ALGO_TINY = (
    "--steps 12 -q --set model.d_model=16 --set train.eval_every=4 --set train.curriculum_interval=2 "
    "--set train_max_len=4 --set test_lengths=[1,4,6] --set test_size=16 --set workers=1"
).split()


def test_algorithmic_writes_a_report_with_figures_11_and_14(tmp_path):
    out = tmp_path / "alg"
    r = runner.invoke(app, ["algorithmic", "--task", "copy", "-o", str(out), "--set", "train.shift_at=6", *ALGO_TINY])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["paradigms"]) == {"single", "looped", "shift"}
    assert set(results["paradigms"]["looped"]["length_accuracy"]) == {
        "adaptive",
        "adaptive_per_sample",
        "oracle",
        "chosen_loops",
    }
    assert results["paradigms"]["single"]["params"] == results["paradigms"]["looped"]["params"]  # equal parameter count
    assert results["shift_saving"]["shift_step"] == 6 and "SHIFT switched at step 6" in r.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Figure 11" in page and "Figure 14" in page
    r = runner.invoke(app, ["algorithmic", "--task", "copy", "-o", str(out), *ALGO_TINY])
    assert r.exit_code == 2 and "--resume" in r.output  # an existing run is never overwritten
    r = runner.invoke(
        app,
        [
            "algorithmic",
            "--task",
            "copy",
            "-o",
            str(out),
            "--resume",
            "--set",
            "train.shift.at=6",
            "--set",
            "train.shift.scp=null",
            *ALGO_TINY,
        ],
    )
    assert r.exit_code == 0, r.output


def test_algorithmic_over_seeds_runs_each_seed_and_reports_over_them(tmp_path):
    out = tmp_path / "seeds"
    args = ["algorithmic", "--task", "parity", "-p", "single,looped", "-o", str(out), "--seeds", "0,1", *ALGO_TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "seeds.json").read_text())
    assert [row["seed"] for row in summary["seeds"]] == [0, 1] and "Looped-Attn generalises" in r.output
    for k in (0, 1):  # each seed is the run `--seed k` gives
        assert json.loads((out / f"seed-{k}" / "results.json").read_text())["config"]["seed"] == k
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 1
    assert runner.invoke(app, args).exit_code == 2  # never overwritten
    r = runner.invoke(app, [*args, "--resume"])  # finished seeds are read back
    assert r.exit_code == 0 and json.loads((out / "seeds.json").read_text()) == summary, r.output
    r = runner.invoke(app, ["algorithmic", "-o", str(tmp_path / "x"), "--seed", "0", "--seeds", "0,1"])
    assert r.exit_code == 2 and "--seeds" in r.output
    r = runner.invoke(app, ["algorithmic", "-o", str(tmp_path / "y"), "--seeds", "0,0"])
    assert r.exit_code == 2 and "seeds" in r.output


@pytest.mark.parametrize(
    "args, field",
    [
        (["--task", "sorting"], "task"),
        (["--preset", "huge"], "preset"),
        (["--paradigm", "single,recurrent"], "paradigms"),
        (["--set", "train.precision=fp8"], "train.precision"),
        (["--set", "model.n_heads=5"], "model.n_heads"),
    ],
)
def test_algorithmic_rejects_bad_settings_by_name(tmp_path, args, field):
    r = runner.invoke(app, ["algorithmic", "-o", str(tmp_path / "x"), *args])
    assert r.exit_code == 2 and field in r.output, r.output


def test_reproduce_can_add_algorithmic_sections(tmp_path):
    out = tmp_path / "rep"
    r = runner.invoke(
        app,
        [
            "reproduce",
            "--quick",
            "-o",
            str(out),
            "-q",
            "--set",
            "algorithmic.tasks=[parity]",
            "--set",
            "algorithmic.steps=10",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert any(v["claim"].startswith("parity: Looped-Attn generalises") for v in report["verdicts"])
    assert 'id="algorithmic-parity"' in (out / "report.html").read_text()


def test_algorithmic_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "alg"
    assert (
        runner.invoke(app, ["algorithmic", "--task", "parity", "-p", "single", "-o", str(out), *ALGO_TINY]).exit_code
        == 0
    )
    r = runner.invoke(
        app,
        [
            "algorithmic",
            "--task",
            "parity",
            "-p",
            "single",
            "-o",
            str(out),
            "--resume",
            *ALGO_TINY,
            "--set",
            "train.lr=0.5",
        ],
    )
    assert r.exit_code == 2 and "configuration differs" in r.output


def test_length_readings_train_each_model_reading_and_score_both_target_readings(tmp_path):
    out = tmp_path / "lr"
    args = f"length-readings -o {out} -q --epochs 3 --seeds 0,1 --set data.n_test=200 --set workers=1".split()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "length_readings.json").read_text())["readings"]
    readings = [(x["attention"], x["positions"], x["test_targets"]) for x in rows]
    assert len(set(readings)) == 16 == len(rows)  # 2 attention x 4 positions x 2 test targets
    assert [x for x in readings if rows[readings.index(x)]["default"]] == [("sum", "cyclic_end", "aligned")]
    # codes from the end and from the start are one model at the training length: trained once, read two ways
    by = {x: rows[readings.index(x)] for x in readings}
    assert by[("sum", "cyclic_end", "aligned")]["length"]["4"] == by[("sum", "cyclic", "aligned")]["length"]["4"]
    assert by[("sum", "cyclic_end", "aligned")]["length"]["8"] != by[("sum", "cyclic", "aligned")]["length"]["8"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"{a}-{p}" for a in ("mean", "sum") for p in ("absolute", "cyclic", "none")
    ]
    for x in rows:  # every reading scored on 2 seeds at every length
        assert x["verdict"]["verdict"] != "not tested" and set(x["length"]) == {"4", "8", "11", "14", "17"}
    cyclic, aligned = rows[0]["length"]["8"], rows[1]["length"]["8"]
    assert rows[0]["test_targets"] == "cyclic" and rows[1]["test_targets"] == "aligned"
    assert cyclic["bayes_all"] != aligned["bayes_all"]  # other test sets, other Bayes-optimal accuracy
    assert rows[0]["length"]["4"] == rows[1]["length"]["4"]  # the training length is the same set
    table = (out / "length_readings.md").read_text()
    assert table.count("\n| ") == 17 and "| **sum (paper)** | **cyclic codes from the end** | **aligned** |" in table
    assert "the query gets a position code it never had as a query in training" in table  # why not the headline
    r = runner.invoke(app, [*args, "--resume"])  # finished runs are read back, not retrained
    assert r.exit_code == 0, r.output
    assert json.loads((out / "length_readings.json").read_text())["readings"] == rows


def test_help_shows_the_extras_it_names():
    """rich read `[hf]` as markup and printed 'needs the  extra'."""
    out = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "(needs the [hf] extra)" in out


def test_algorithmic_splits_the_looped_hessian_by_loop_pairs_when_asked(tmp_path):
    out = tmp_path / "alg"
    args = ["algorithmic", "--task", "parity", "-p", "single,looped", "-o", str(out), *ALGO_TINY]
    r = runner.invoke(app, [*args, "--set", "loop_coupling_params=model.layers.0.attn.proj.bias"])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    c = results["paradigms"]["looped"]["loop_coupling"]
    assert "loop_coupling" not in results["paradigms"]["single"]
    assert c["params"] == results["config"]["model"]["d_model"] and c["n_loops"] >= 1
    assert c["trace"]["full"] == pytest.approx(c["trace"]["diagonal"] + c["trace"]["cross"], rel=1e-9, abs=1e-12)
    page = (out / "report.html").read_text()
    assert "split by loop pairs" in page and "the V-valley comes from cross-loop coupling" in page


def test_reproduce_over_languages_runs_the_best_fitting_ones_and_tabulates_the_words(tmp_path, monkeypatch):
    """--languages K: the K best eligible languages by the data-facts rule (no outcome), one report each, and
    every claim's verdicts as a distribution; a bad K is one line naming the option."""
    from loopscape.data.languages import rank_languages
    from loopscape.experiments import reproduce
    from loopscape.experiments.reproduce import ReproduceConfig

    monkeypatch.setattr(reproduce, "LANGUAGE_POOL", range(40))
    ran = []

    def fake_report(cfg, out, resume=False, show_progress=True):
        seed = cfg.markov.data.seed
        ran.append(seed)
        word = "reproduced" if seed % 2 else "contradicted"
        return {
            "verdicts": [{"claim": "Observation 1", "verdict": word}, {"claim": "Theorem 1", "verdict": "reproduced"}]
        }

    monkeypatch.setattr(reproduce, "run_reproduce", fake_report)
    result = reproduce.run_over_languages(ReproduceConfig(), tmp_path / "langs", 3, show_progress=False)
    best = [r["seed"] for r in rank_languages(ReproduceConfig().markov.data, range(40)) if r["eligible"]][:3]
    assert ran == best == result["languages"]
    words = result["verdicts"]["Observation 1"]
    assert sorted(words) == sorted(best) and set(words.values()) <= {"reproduced", "contradicted"}
    table = (tmp_path / "langs" / "languages.md").read_text()
    assert "| Theorem 1 | reproduced | reproduced | reproduced | reproduced: 3 |" in table
    r = runner.invoke(app, ["reproduce", "--languages", "0", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and r.output.strip() == "error: languages must be an integer >= 1 (got 0)"
    assert not (tmp_path / "bad").exists()
