"""YAML recipes, dotted CLI overrides and their errors."""

import pytest

from tunelab.errors import ConfigError
from tunelab.train.config import load_config, option_docs


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: finetune\ntrain:\n  lr: 0.001\n  batch_size: 2\ndata:\n  pack: true\n")
    cfg = load_config(recipe, {"train.lr": "3e-4", "train.max_steps": "7"})
    assert cfg.task == "finetune"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 2 and cfg.train.max_steps == 7
    assert cfg.data.pack is True


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'lr'"):
        load_config(None, {"train.lrr": "1"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(recipe)


def test_bad_values_and_yaml_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, {"train.batch_size": "four"})
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, {"train.max_steps": 2.5})
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(recipe)


def test_every_option_is_documented():
    rows = option_docs()
    assert any(key == "train.lr" for key, *_ in rows)
    assert all(doc for _, _, doc, _ in rows), [k for k, _, d, _ in rows if not d]
