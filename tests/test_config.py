"""The one configuration path: files in order, then overrides; presets are files like any other."""

from dataclasses import fields, is_dataclass, replace

import pytest

from loopscape.config import ConfigError, load_config, preset_file, to_dict
from loopscape.data.algorithmic import TASKS
from loopscape.experiments.algorithmic import PRESETS, AlgorithmicStudyConfig, algorithmic_preset, preset_files
from loopscape.experiments.markov import PAPER_TOY_MODEL, MarkovStudyConfig
from loopscape.experiments.reproduce import ReproduceConfig
from loopscape.experiments.retrofit import RetrofitConfig
from loopscape.experiments.shift import ShiftStudyConfig
from loopscape.experiments.theory import TheoryStudyConfig
from loopscape.models.linear_attn import LinearAttn, LinearAttnConfig


def test_later_files_override_earlier_ones_setting_by_setting(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.toml"
    a.write_text("train: {epochs: 7, lr: 0.01}\nseeds: [1, 2]\n")
    b.write_text("[train]\nepochs = 9\n")
    cfg = load_config(MarkovStudyConfig, [a, b], {"seeds": [3]})
    assert (cfg.train.epochs, cfg.train.lr, cfg.seeds) == (9, 0.01, [3])
    assert cfg.train.batch_size == MarkovStudyConfig().train.batch_size  # untouched settings keep their defaults


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", TASKS)
def test_every_algorithmic_preset_loads_for_every_task(preset, task):
    cfg = algorithmic_preset(preset, task, steps=123)
    assert cfg.task == task and cfg.train.steps == 123 and cfg.model.vocab_size is None
    assert max(cfg.test_lengths) > cfg.train_max_len  # every preset tests past the training lengths


AUTHORS_INTERVAL = {"parity": 500, "copy": 1000, "addition": 1600, "binary_sum": 500, "unique_set": 1000}


@pytest.mark.parametrize("task", TASKS)
def test_paper_presets_are_the_authors_setting(task):
    """The spec's table: each task's curriculum interval; 50,001 steps (seed paper) or 100,001 (authors)."""
    paper, authors, small = (algorithmic_preset(p, task) for p in ("paper", "authors", "cpu-small"))
    assert paper.train.curriculum_interval == AUTHORS_INTERVAL.get(task, 500)
    assert (paper.train.steps, authors.train.steps) == (50_001, 100_001)
    assert authors.train.curriculum_interval == paper.train.curriculum_interval and authors.model == paper.model
    assert small.train.curriculum_interval == paper.train.curriculum_interval // 4
    assert paper.model.read_in == small.model.read_in == ("embedding" if task == "unique_set" else "linear")


def test_quick_preset_is_a_file_read_by_the_same_loader():
    quick = load_config(ReproduceConfig, preset_file("reproduce-quick.yaml"))
    assert quick.markov.train.epochs == 40 and quick.markov.seeds == [0, 1] and quick.shift.scp.patience == 5


def test_a_model_config_that_checks_itself_names_its_field():
    with pytest.raises(ConfigError, match=r"^model\.n_heads must divide d_model"):
        load_config(
            AlgorithmicStudyConfig, preset_file("algorithmic", "cpu-small", "parity.yaml"), {"model.n_heads": 3}
        )
    with pytest.raises(ConfigError, match=r"model\.vocab_size must be null"):
        load_config(MarkovStudyConfig, None, {"model.vocab_size": 4})


# -- an override changes its field and nothing else (a section read over the study's default, not its class's) ----


def _leaves(config, prefix=""):
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


STUDIES = [MarkovStudyConfig, ShiftStudyConfig, TheoryStudyConfig, RetrofitConfig, ReproduceConfig]


@pytest.mark.parametrize("study", STUDIES, ids=lambda c: c.__name__)
def test_setting_any_field_to_its_default_leaves_the_whole_config_unchanged(study):
    default = load_config(study)
    for key, value in _leaves(default):
        assert load_config(study, overrides={key: value}) == default, key


@pytest.mark.parametrize("preset", PRESETS)
def test_overrides_on_an_algorithmic_preset_change_nothing_else(preset):
    default = algorithmic_preset(preset, "parity")
    for key, value in _leaves(default):
        assert load_config(AlgorithmicStudyConfig, preset_files(preset, "parity"), {key: value}) == default, key


def test_the_markov_study_model_differs_from_its_class_and_an_override_keeps_it():
    """The bug this guards: `--set model.init_scale=0.5` rebuilt `model` from LinearAttnConfig's
    class defaults (1 loop, 16 absolute positions) instead of the study's (3 loops, 3 cyclic codes from the end)."""
    study = MarkovStudyConfig()
    assert study.model != LinearAttnConfig()  # otherwise this test would prove nothing
    cfg = load_config(MarkovStudyConfig, overrides={"model.init_scale": 0.5})
    assert cfg == replace(study, model=replace(study.model, init_scale=0.5))
    assert (cfg.model.n_loops, cfg.model.max_len, cfg.model.positions) == (3, 3, "cyclic_end")
    rep = load_config(ReproduceConfig, overrides={"markov.model.init_scale": 0.5})
    assert rep.markov == cfg
    quick = load_config(ReproduceConfig, [preset_file("reproduce-quick.yaml")], {"markov.model.init_scale": 0.5})
    assert quick.markov.model == cfg.model and quick.markov.train.epochs == 40


def test_a_study_or_a_model_changes_no_later_default():
    """The bug this guards: every MarkovStudyConfig() shared PAPER_TOY_MODEL, and a model's n_loops setter wrote
    into the config it was built from, so setting n_loops on one model (as SHIFT does) changed every later study."""
    study = MarkovStudyConfig()
    assert study.model is not MarkovStudyConfig().model and study.model == PAPER_TOY_MODEL
    study.model.vocab_size = 3  # a model straight from the study's own config
    model = LinearAttn(study.model)
    model.n_loops = 7
    assert model.n_loops == 7 and model.config.n_loops == 7
    assert study.model.n_loops == 3 and PAPER_TOY_MODEL.n_loops == 3
    study.model.n_loops = 5
    assert MarkovStudyConfig().model.n_loops == 3 and MarkovStudyConfig().model.vocab_size is None


def test_a_folder_written_before_a_setting_existed_resumes(tmp_path):
    """A run folder's config.yaml from before `data.rows` existed: the same settings, so it resumes."""
    import yaml

    from loopscape.io import same_config

    cfg = MarkovStudyConfig()
    old = to_dict(cfg)
    del old["data"]["rows"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert same_config(tmp_path / "config.yaml", cfg)
    assert not same_config(tmp_path / "config.yaml", replace(cfg, seeds=[0]))
    old["data"]["gone"] = 1  # a setting that no longer exists
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert not same_config(tmp_path / "config.yaml", cfg)
