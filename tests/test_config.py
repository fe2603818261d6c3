"""Config loading: YAML + overrides, typos with suggestions, type and range errors."""

import pytest
import yaml

from jaxgpt2.config import GPTConfig, _coerce, _override_value, load_config, resolve_auto
from jaxgpt2.errors import ConfigError


def test_yaml_and_dotted_overrides(tmp_path):
    cfg = load_config("configs/shakespeare_char_cpu.yaml",
                      ["train.max_steps=500", "model.n_layer=2", "optim.lr=3e-4",
                       "train.out_dir=0123"])
    assert cfg.train.max_steps == 500 and cfg.model.n_layer == 2
    assert cfg.optim.lr == 3e-4 and cfg.model.n_embd == 128
    # A YAML dump of the resolved config (what a run folder keeps) loads back unchanged.
    (tmp_path / "dump.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(tmp_path / "dump.yaml") == cfg


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


@pytest.mark.parametrize("override, expected", [
    ("train.sample_prompt=ROMEO:", "ROMEO:"),        # YAML: a mapping {'ROMEO': None}
    ("train.out_dir=0123", "0123"),                  # YAML 1.1: the octal number 83
    ("train.out_dir=1.50", "1.50"),                  # YAML: the float 1.5
    ("train.out_dir=2024-06-01", "2024-06-01"),      # YAML: a datetime.date
    ("train.sample_prompt=[x", "[x"),                # not valid YAML at all
    ("train.sample_prompt= ROMEO", " ROMEO"),        # YAML strips the space
    ("data.dataset=yes", "yes"),                     # YAML 1.1: True
    ("train.sample_prompt=", ""),
])
def test_overrides_reach_str_fields_as_typed(override, expected):
    section, rest = override.split(".", 1)
    cfg = load_config("configs/tiny.yaml", [override])
    assert getattr(getattr(cfg, section), rest.split("=", 1)[0]) == expected


@pytest.mark.parametrize("raw, expected", [
    ("null", None), ("~", None), ("", ""), ("None", "None"), ("0123", "0123"),
    ("ROMEO:", "ROMEO:"), ("[x", "[x"),
])
def test_str_or_none_overrides_take_the_text_unless_yaml_null(raw, expected):
    assert _coerce("k", _override_value(f"k={raw}", raw), str | None) == expected


def test_numbers_for_other_fields_still_come_from_yaml():
    assert _coerce("k", _override_value("k=null", "null"), int | None) is None
    cfg = load_config("configs/tiny.yaml", ["train.debug_nan_steps=[3, 5]", "optim.lr=3e-4",
                                            "train.resume_step=null", "train.progress=false"])
    assert cfg.train.debug_nan_steps == [3, 5] and cfg.optim.lr == 3e-4
    assert cfg.train.resume_step is None and cfg.train.progress is False


def test_leading_zero_integer_overrides_are_decimal_not_octal():
    cfg = load_config("configs/tiny.yaml", ["train.seed=0123", "train.max_steps=010"])
    assert (cfg.train.seed, cfg.train.max_steps) == (123, 10)


@pytest.mark.parametrize("text, shown", [("0123", "int 83"), ("1.50", "float 1.5"),
                                         ("2024-06-01", "date"), ("yes", "bool True")])
def test_a_number_for_a_str_field_in_a_file_must_be_quoted(tmp_path, text, shown):
    (tmp_path / "c.yaml").write_text(f"train:\n  out_dir: {text}\n")
    with pytest.raises(ConfigError, match=f"train.out_dir: expected text, but YAML read the "
                                          f"value as the {shown}.*quote it"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(f'train:\n  out_dir: "{text}"\n')
    assert load_config(tmp_path / "c.yaml").train.out_dir == text


def test_a_yaml_syntax_error_in_a_file_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  n_layer: 2\n n_head: 2\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not valid YAML: "
                                          r"line 3, column 2: expected <block end>"):
        load_config(tmp_path / "bad.yaml")


def test_an_override_with_bad_yaml_for_a_non_str_field_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train.debug_nan_steps=\[x': the value is "
                                          r"not valid YAML \(.*expected ',' or '\]'"):
        load_config("configs/tiny.yaml", ["train.debug_nan_steps=[x"])


def test_a_section_replaced_by_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"model must be a section \(a mapping\), got 'gpt2'.*"
                                          r"did you mean model.preset=gpt2\?"):
        load_config(None, ["model=gpt2"])
    with pytest.raises(ConfigError, match=r"train must be a section \(a mapping\), got 3"):
        load_config(None, ["train=3"])
    with pytest.raises(ConfigError, match=r"'model' is not a section"):
        load_config(None, ["model=gpt2", "model.n_layer=2"])
    cfg = load_config(None, ["model={n_layer: 2, n_head: 2}", "model.n_embd=32"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 2, 32)


def test_an_empty_config_file_is_refused_not_taken_as_every_default(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"config file '.*empty.yaml' is empty; write the "
                                          r"settings there"):
        load_config(tmp_path / "empty.yaml")


def test_a_config_folder_is_refused_naming_a_file_to_use(tmp_path):
    with pytest.raises(ConfigError, match=r"--config '.*' is a folder; name a YAML file in it"):
        load_config(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("model.n_head=0", r"model.n_head must be positive, got 0"),
    ("train.out_dir=", r"train.out_dir is empty, which would write into the current folder"),
    ("train.out_dir=  ", r"train.out_dir is empty"),
])
def test_values_that_crashed_or_wrote_in_place_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_a_choice_field_lists_its_allowed_values_declared_once():
    with pytest.raises(ConfigError, match=r"model.remat='fulll' is not one of none, full, "
                                          r"dots_saveable, .*; did you mean 'full'\?"):
        load_config("configs/tiny.yaml", ["model.remat=fulll"])
    with pytest.raises(ConfigError, match=r"train.best_direction='up' is not one of min, max"):
        load_config("configs/tiny.yaml", ["train.best_direction=up"])


def test_a_config_built_in_python_is_checked_against_the_same_choices():
    with pytest.raises(ConfigError, match=r"model.attention='flash' is not one of auto, cudnn, xla"):
        GPTConfig(attention="flash").validate()


@pytest.mark.parametrize("platform, dtype, attention, kernels", [
    ("cpu", "float32", "xla", "xla"), ("gpu", "bfloat16", "cudnn", "pallas"),
    ("tpu", "bfloat16", "xla", "xla")])
def test_auto_is_decided_by_one_function_for_every_platform(platform, dtype, attention, kernels):
    resolved = resolve_auto(GPTConfig(), platform)
    assert (resolved.dtype, resolved.attention, resolved.kernels) == (dtype, attention, kernels)
    # An explicit float32 on a GPU keeps XLA attention: cuDNN has no float32 kernel.
    assert resolve_auto(GPTConfig(dtype="float32"), "gpu").attention == "xla"
    # The fused kernels are one program per device: several GPUs keep XLA's ops.
    assert resolve_auto(GPTConfig(), "gpu", device_count=2).kernels == "xla"
    assert resolve_auto(GPTConfig(dtype="float16"), "gpu").kernels == "xla"
