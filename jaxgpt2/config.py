"""Typed run configuration: YAML files plus dotted ``key=value`` overrides.

Configs are data, never code: YAML is parsed with ``yaml.safe_load`` and every key is
checked against the dataclasses below, so a typo fails loudly with the closest valid
name instead of being silently ignored (nanoGPT's ``exec`` configurator cannot do that).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxgpt2.errors import ConfigError

# The allowed values of each choice field, declared once: the loader checks them
# (``_coerce``), errors list them, and the modules that act on them read them from here.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Attention = Literal["auto", "cudnn", "xla"]
Kernels = Literal["auto", "pallas", "xla"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                      "save_attention_out"]
DataMode = Literal["windows", "padded"]
OptimizerName = Literal["adamw", "lion", "adafactor", "sgd", "muon"]
ScheduleName = Literal["cosine", "constant", "linear", "wsd", "inverse_sqrt"]
DecayShape = Literal["linear", "1-sqrt"]
DeviceKind = Literal["auto", "cpu", "gpu", "tpu"]
Direction = Literal["min", "max"]


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 architecture and how to compute it.

    ``dtype`` is the compute dtype (``auto``: bfloat16 on GPU/TPU, float32 on CPU, decided
    by ``resolve_auto``); parameters are always stored in float32.
    ``remat`` picks a ``jax.checkpoint`` policy per block (``jaxgpt2.remat``).
    ``scan_layers`` runs the blocks under ``lax.scan`` (flat compile time) instead of a
    Python loop (faster on GPU); the parameter layout is the same either way.
    Frozen, so a model (and its jitted functions) can be keyed on it.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    dtype: Dtype = "auto"
    remat: RematPolicy = "none"
    scan_layers: bool = True
    attention: Attention = "auto"
    kernels: Kernels = "auto"

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 128 so the output matmul tiles evenly."""
        return -(-self.vocab_size // 128) * 128

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "choose n_embd as a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        check_choices(self, "model")


def resolve_auto(config: GPTConfig, platform: str, device_count: int = 1) -> GPTConfig:
    """``config`` with ``auto`` decided for ``platform`` (``jax.default_backend()``):
    bfloat16 compute on GPU/TPU and float32 on CPU; cuDNN flash attention on GPU for
    16-bit compute (it has no float32 kernel), XLA's otherwise; the fused Pallas kernels
    (``jaxgpt2.kernels``) for bfloat16 on one GPU, where they were measured to pay.
    A kernel is one program per device, so more devices keep XLA's partitioned ops."""
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if platform in ("gpu", "tpu") else "float32"
    attention = config.attention
    if attention == "auto":
        sixteen_bit = dtype in ("bfloat16", "float16")
        attention = "cudnn" if platform == "gpu" and sixteen_bit else "xla"
    kernels = config.kernels
    if kernels == "auto":
        one_gpu = platform == "gpu" and device_count == 1
        kernels = "pallas" if one_gpu and dtype == "bfloat16" else "xla"
    return dataclasses.replace(config, dtype=dtype, attention=attention, kernels=kernels)


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass(frozen=True)
class ModelConfig(GPTConfig):
    """The ``model`` section: a GPTConfig plus where its sizes and weights come from.

    ``vocab_size: null`` takes the vocabulary size from the prepared dataset.
    ``preset`` fills the sizes of an OpenAI GPT-2 model; explicit keys still win.
    """

    vocab_size: int | None = None
    preset: str = ""
    init_from: str = ""

    def gpt_config(self) -> GPTConfig:
        names = [f.name for f in dataclasses.fields(GPTConfig)]
        return GPTConfig(**{n: getattr(self, n) for n in names})


@dataclass
class DataConfig:
    """Where tokens come from.

    ``dataset`` is a bundled corpus name (``shakespeare_char``, ``shakespeare``) that is
    prepared on first use under ``cache_dir``, or the path of a folder made by
    ``python -m jaxgpt2.prepare``. ``mode`` is ``windows`` (random contiguous windows,
    for pretraining) or ``padded`` (one document per row, right-padded and masked).
    ``batch_size`` is the global micro-batch, split across devices.
    """

    dataset: str = "shakespeare_char"
    cache_dir: str = "data"
    mode: DataMode = "windows"
    batch_size: int = 32
    prefetch: int = 2

    def validate(self) -> None:
        check_choices(self, "data")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")


@dataclass
class OptimConfig:
    """The optimizer (``name``, from ``optim.OPTIMIZERS``) under a learning-rate schedule
    (``schedule``, from ``optim.SCHEDULES``), clipped and guarded against non-finite steps.

    ``decay_steps: null`` decays over ``train.max_steps``. ``schedule: constant`` holds
    ``lr`` after warmup (fine-tuning recipes). ``loss_scale`` (the initial scale) and
    ``loss_scale_interval`` (finite steps that double it) apply to float16 runs only.

    A field named in ``FOR_OPTIMIZERS`` or ``FOR_SCHEDULES`` applies only to the
    optimizers or schedules listed there; every other field applies to all of them.
    ``weight_decay`` is decoupled and scaled by the learning rate under every optimizer
    (each step shrinks kernels and embeddings by ``lr * weight_decay``), so a 10x smaller
    ``lr`` needs a 10x larger ``weight_decay`` to decay as fast. Under ``muon``, ``lr``,
    ``b1``, ``b2``, ``eps`` and ``weight_decay`` drive its AdamW part (embeddings, biases,
    LayerNorms) and the ``muon_*`` fields its Muon part (the blocks' kernels).
    ``docs/optimizers.md`` gives each default's source.
    """

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 2000
    decay_steps: int | None = None
    name: OptimizerName = "adamw"
    schedule: ScheduleName = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    loss_scale: float = 65536.0
    loss_scale_interval: int = 2000
    max_consecutive_nonfinite: int = 5
    decay_fraction: float = 0.2
    decay_shape: DecayShape = "1-sqrt"
    lion_b1: float = 0.9
    lion_b2: float = 0.99
    sgd_momentum: float = 0.9
    sgd_nesterov: bool = False
    adafactor_decay_rate: float = 0.8
    adafactor_clipping_threshold: float = 1.0
    adafactor_multiply_by_parameter_scale: bool = True
    adafactor_momentum: float | None = None
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0

    # Where each rule-specific field applies. Set to a non-default value under any other
    # optimizer or schedule, it is refused by name rather than silently ignored; a new
    # optimizer or schedule lists its own fields here.
    FOR_OPTIMIZERS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "b1": ("adamw", "muon"), "b2": ("adamw", "muon"), "eps": ("adamw", "muon"),
        "lion_b1": ("lion",), "lion_b2": ("lion",),
        "sgd_momentum": ("sgd",), "sgd_nesterov": ("sgd",),
        "adafactor_decay_rate": ("adafactor",), "adafactor_clipping_threshold": ("adafactor",),
        "adafactor_multiply_by_parameter_scale": ("adafactor",),
        "adafactor_momentum": ("adafactor",),
        "muon_lr": ("muon",), "muon_momentum": ("muon",), "muon_ns_steps": ("muon",),
        "muon_weight_decay": ("muon",),
    }
    FOR_SCHEDULES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "min_lr": ("cosine", "linear", "wsd"), "decay_steps": ("cosine", "linear", "wsd"),
        "decay_fraction": ("wsd",), "decay_shape": ("wsd",),
    }

    def validate(self) -> None:
        check_choices(self, "optim")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.schedule in self.FOR_SCHEDULES["min_lr"] and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ConfigError("optim.weight_decay must be >= 0 and optim.grad_clip > 0")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("optim.max_consecutive_nonfinite must be >= 1")
        if self.loss_scale < 1 or self.loss_scale_interval < 1:
            raise ConfigError("optim.loss_scale and optim.loss_scale_interval must be >= 1, "
                              f"got {self.loss_scale} and {self.loss_scale_interval}")
        self._check_rule_ranges()
        self._refuse_inapplicable()

    def _check_rule_ranges(self) -> None:
        """Range checks of the optimizer- and schedule-specific fields."""
        for key in ("lion_b1", "lion_b2", "sgd_momentum", "muon_momentum", "adafactor_momentum"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {value}")
        for key in ("muon_lr", "muon_ns_steps", "adafactor_decay_rate",
                    "adafactor_clipping_threshold", "decay_fraction"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"optim.{key} must be positive, got {getattr(self, key)}")
        if self.muon_weight_decay < 0 or self.decay_fraction > 1:
            raise ConfigError("optim.muon_weight_decay must be >= 0 and optim.decay_fraction "
                              f"<= 1, got {self.muon_weight_decay} and {self.decay_fraction}")
        if self.schedule == "inverse_sqrt" and self.warmup_steps < 1:
            raise ConfigError("optim.schedule=inverse_sqrt needs optim.warmup_steps >= 1: "
                              "after warmup the rate is lr * sqrt(warmup_steps / step)")

    def _refuse_inapplicable(self) -> None:
        """A field set for another optimizer or schedule than the chosen one is an error."""
        for table, key, chosen in ((self.FOR_OPTIMIZERS, "name", self.name),
                                   (self.FOR_SCHEDULES, "schedule", self.schedule)):
            for field_name, applies in table.items():
                if chosen not in applies and self._is_set(field_name):
                    raise ConfigError(
                        f"optim.{field_name}={getattr(self, field_name)!r} applies to "
                        f"optim.{key} {', '.join(applies[:-1]) + ' and ' if applies[1:] else ''}"
                        f"{applies[-1]}, not {chosen}; remove it or choose "
                        f"optim.{key}={applies[0]}")

    def _is_set(self, field_name: str) -> bool:
        """Whether a field differs from its default. ``min_lr`` equal to ``lr`` also counts
        as unset: it says "no decay", as nanoGPT's fine-tuning recipe (a constant
        schedule) spells it."""
        value = getattr(self, field_name)
        if field_name == "min_lr" and value == self.lr:
            return False
        return value != OptimConfig.__dataclass_fields__[field_name].default


@dataclass
class TrainConfig:
    """The loop: length, cadence of logs/evals/checkpoints, outputs and devices.

    ``best_metric`` is the evaluation metric by which one checkpoint is kept beside the
    latest ``keep`` (``best_direction``: ``min`` when lower is better, ``max`` otherwise).
    ``hellaswag`` names a HellaSwag JSONL file to score at every evaluation ("": none).
    ``progress`` shows a live bar on a terminal and plain log lines otherwise.
    ``tensorboard`` and ``wandb_project`` add those writers to ``metrics.jsonl``.
    ``eval_sample_tokens`` > 0 samples that many tokens after ``sample_prompt`` at every
    evaluation into ``samples.txt``; ``plot`` redraws ``loss.png`` at every evaluation.

    ``auto_batch`` splits the global batch (``data.batch_size * grad_accum`` rows, kept as
    configured) into the largest micro-batch per device whose compiled step fits
    ``auto_batch_fraction`` of the device's memory, or ``auto_batch_memory_gb`` GiB (an
    explicit budget; the CPU reports no memory and needs one), and sets ``data.batch_size``
    and ``grad_accum`` to that split (``jaxgpt2.auto_batch``).

    ``debug_nan_steps`` is for tests only: those steps get NaN gradients, so the
    non-finite guard can be exercised end to end.
    """

    max_steps: int = 5000
    grad_accum: int = 1
    eval_interval: int = 250
    eval_steps: int = 200
    log_interval: int = 10
    save_interval: int = 1000
    keep: int = 2
    out_dir: str = "out"
    resume: bool = False
    resume_step: int | None = None
    seed: int = 1337
    device: DeviceKind = "auto"
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""
    eval_sample_tokens: int = 0
    plot: bool = True
    best_metric: str = "val_loss"
    best_direction: Direction = "min"
    hellaswag: str = ""
    auto_batch: bool = False
    auto_batch_memory_gb: float | None = None
    auto_batch_fraction: float = 0.9
    debug_nan_steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum", "eval_interval", "log_interval", "save_interval",
                     "keep"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if min(self.eval_steps, self.sample_tokens, self.eval_sample_tokens) < 0:
            raise ConfigError("train.eval_steps, train.sample_tokens and "
                              "train.eval_sample_tokens must be >= 0")
        for name, module, extra in (("tensorboard", "tensorboardX", "tensorboard"),
                                    ("wandb_project", "wandb", "wandb")):
            if getattr(self, name) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"train.{name} needs the {module} package: pip install "
                                  f"'jaxgpt2[{extra}]' (or leave train.{name} off)")
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty, which would write into the current "
                              "folder; name the run's folder, e.g. train.out_dir=out/run1")
        self._check_auto_batch()
        check_choices(self, "train")

    def _check_auto_batch(self) -> None:
        """The budget's fields in range, and set only where they apply (as optimizer
        fields are: refused by name rather than silently ignored)."""
        if self.auto_batch_memory_gb is not None and self.auto_batch_memory_gb <= 0:
            raise ConfigError("train.auto_batch_memory_gb must be positive (GiB per device), "
                              f"got {self.auto_batch_memory_gb}")
        if not 0 < self.auto_batch_fraction <= 1:
            raise ConfigError("train.auto_batch_fraction must be in (0, 1], got "
                              f"{self.auto_batch_fraction}")
        fraction_set = self.auto_batch_fraction != TrainConfig.auto_batch_fraction
        if not self.auto_batch and (self.auto_batch_memory_gb is not None or fraction_set):
            raise ConfigError("train.auto_batch_memory_gb and train.auto_batch_fraction apply "
                              "only with train.auto_batch=true; set it or remove them")
        if self.auto_batch_memory_gb is not None and fraction_set:
            raise ConfigError("train.auto_batch_fraction is a share of the memory the device "
                              "reports, and train.auto_batch_memory_gb replaces that; set one "
                              "of them")


@dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 takes all remaining devices."""

    data: int = -1
    fsdp: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self) -> None:
        """Range checks that need no data or devices; run before anything is written."""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_choices(section: Any, prefix: str) -> None:
    """Every ``Literal`` field of a config dataclass holds one of its declared values
    (the loader already checks; this catches configs built in Python)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if typing.get_origin(hints[f.name]) is Literal:
            _check_choice(f"{prefix}.{f.name}", getattr(section, f.name), hints[f.name])


def _check_choice(key: str, value: Any, annotation: Any) -> Any:
    choices = typing.get_args(annotation)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
                          + _suggest(str(value), [str(c) for c in choices]))
    return value


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class _OverrideValue:
    """An override's value both as typed and as YAML reads it.

    Overrides land in the raw tree before field types are known, so the choice waits for
    ``_coerce``: str fields take ``text``, the others ``parsed()``. Text that is not valid
    YAML is fine for a str field, so its YAML ``error`` is raised only when the value is
    needed.
    """

    override: str
    text: str
    value: Any = None
    error: str = ""

    def parsed(self) -> Any:
        if self.error:
            raise ConfigError(f"override {self.override!r}: the value is not valid YAML "
                              f"({self.error}); fix its syntax, e.g. a list is [1, 2]")
        return self.value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """yaml's complaint on one line: where (line and column, when known) and what."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + problem + (f" ({context})" if context else "")


def _override_value(override: str, raw: str) -> _OverrideValue:
    """Keep ``raw`` and what YAML reads from it; an empty value is the empty string, and
    a decimal with leading zeros is that decimal (YAML 1.1 would read ``0123`` as octal
    83, so ``train.seed=0123`` would silently train another seed)."""
    if not raw.strip():
        return _OverrideValue(override, raw, "")
    if re.fullmatch(r"[+-]?0\d+", raw.strip()):
        return _OverrideValue(override, raw, int(raw.strip(), 10))
    try:
        return _OverrideValue(override, raw, yaml.safe_load(raw))
    except yaml.YAMLError as err:
        return _OverrideValue(override, raw, error=_yaml_problem(err))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a dataclass field annotation, converting ints to floats.

    An override (``_OverrideValue``) gives str fields its text as typed (see
    ``_takes_text``) and every other field the value YAML reads from that text.
    """
    if isinstance(value, _OverrideValue):
        if _takes_text(value, annotation):
            return value.text
        value = value.parsed()
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return _check_choice(key, value, annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {annotation}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(key, v, item) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and not isinstance(value, (str, dict, list, type(None))):
        # The text is gone (0123 was read as 83, 1.50 as 1.5), so str(value) would guess.
        leaf = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}: expected text, but YAML read the value as the "
                          f"{type(value).__name__} {value}; quote it so YAML keeps it as "
                          f'written, e.g. {leaf}: "0123"')
    if annotation in (int, float, bool, str):
        if type(value) is not annotation:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r} "
                              f"({type(value).__name__})")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _takes_text(value: _OverrideValue, annotation: Any) -> bool:
    """Whether an override fills a field with its text as typed rather than YAML's reading.

    A str field always does: YAML would make ``ROMEO:`` a mapping, ``0123`` the number 83
    and ``2024-06-01`` a date. A union with str (``str | None``) does too, except for a
    YAML null (``null``, ``~``) when None is allowed; an empty value stays the empty
    string, as for a plain str field.
    """
    if annotation is str or _is_text_choice(annotation):
        return True
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType) or str not in options:
        return False
    return not (type(None) in options and not value.error and value.value is None)


def _is_text_choice(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Literal and all(
        isinstance(c, str) for c in typing.get_args(annotation))


def _section(key: str, value: Any) -> dict[str, Any]:
    """``value`` as a section's mapping, or a ConfigError saying that ``key`` needs one."""
    if isinstance(value, _OverrideValue):
        value = value.parsed()
    if isinstance(value, dict):
        return value
    preset = key == "model" and str(value) in PRESETS  # model=gpt2 for model.preset=gpt2
    hint = f"; did you mean {key}.preset={value}?" if preset else ""
    raise ConfigError(f"{key} must be a section (a mapping), got {value!r}; set the keys "
                      f"inside it instead, e.g. {key}.<name>=<value>{hint}")


def _build(cls, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'"
                              + _suggest(key, names) + f" (valid keys: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], _section(f"{prefix}{key}", value), f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, "
                          "e.g. train.max_steps=500")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, _OverrideValue) and isinstance(child.value, dict):
            child = node[part] = child.value  # a section set by an earlier override
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _override_value(override, raw)


def _apply_preset(tree: dict[str, Any]) -> None:
    model = _section("model", tree.get("model") or {})
    preset = _coerce("model.preset", model.get("preset", ""), str)
    if not preset:
        return
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown" + _suggest(preset, PRESETS)
                          + f" (presets: {', '.join(PRESETS)})")
    tree["model"] = {**PRESETS[preset], **model}


def _read_yaml_file(path: Path) -> Any:
    """Parse a config file; a syntax error names the file and line, not a yaml traceback."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}; "
                          "fix the syntax there") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists() and path.with_suffix(".yaml").exists():
            path = path.with_suffix(".yaml")
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} not found; configs live in configs/, "
                              "e.g. --config configs/shakespeare_char_cpu.yaml")
        if path.is_dir():
            raise ConfigError(f"--config {str(path)!r} is a folder; name a YAML file in it, "
                              "e.g. --config configs/shakespeare_char_cpu.yaml")
        tree = _read_yaml_file(path)
        if tree is None:  # an empty file would silently train every default
            raise ConfigError(f"config file {str(path)!r} is empty; write the settings there "
                              "(see configs/*.yaml) or leave out --config for the defaults")
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        _apply_override(tree, override)
    _apply_preset(tree)
    config = _build(Config, tree, "")
    config.validate()
    return config

