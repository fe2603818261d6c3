"""Config loading: YAML + overrides, typos with suggestions, type and range errors."""

import pytest

from jaxgpt2.config import ConfigError, config_from_dict, load_config


def test_yaml_and_dotted_overrides():
    cfg = load_config("configs/shakespeare_char_cpu.yaml",
                      ["train.max_steps=500", "model.n_layer=2", "optim.lr=3e-4"])
    assert cfg.train.max_steps == 500 and cfg.model.n_layer == 2
    assert cfg.optim.lr == 3e-4 and cfg.model.n_embd == 128
    assert config_from_dict(cfg.to_dict()) == cfg


def test_typo_fails_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*did you mean 'max_steps'"):
        load_config("configs/tiny.yaml", ["train.max_step=10"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        load_config("configs/tiny.yaml", ["modle.n_layer=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.max_steps: expected int, got 'many'"):
        load_config("configs/tiny.yaml", ["train.max_steps=many"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr must be positive"),
    ("model.n_embd=33", "not divisible by model.n_head"),
    ("model.remat=ful", "did you mean 'full'"),
    ("data.batch_size=0", "data.batch_size must be positive"),
])
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_presets_fill_gpt2_sizes_and_explicit_keys_win():
    cfg = load_config(None, ["model.preset=gpt2-medium", "model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 16, 1024)
    with pytest.raises(ConfigError, match="did you mean 'gpt2-xl'"):
        load_config(None, ["model.preset=gpt2-xxl"])
