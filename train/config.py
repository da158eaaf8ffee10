"""Stage recipes: typed dataclasses, YAML loading with unknown-key errors, and ``--set key=value`` overrides.

A stage YAML (see ``configs/stages/``) names its init, its trainable parts (those the model declares, see
:mod:`vila_hd.model.parts`) with their learning rates, the data mixture, the look-close settings used in
training, the DeepSpeed config and the loop settings::

    stage: sft
    init: {model: outputs/pretrain/final}       # or {ps3: ..., llm: ...} or {preset: tiny}
    trainable: {projector: 1.5e-5, prompt_head: 1.5e-5, selection: 1.5e-5, vision_tower: 2.0e-6, llm: 1.5e-5}
    data: {registry: configs/datasets/example.yaml, mixture: "llava_sft+grounded*2", max_length: 8192}
    look_close: {num_token_look_close: 10240}
    loss: {selection_weight: 1.0}
    deepspeed: zero3                            # a name in configs/deepspeed/ or a JSON path
    compile: {enabled: true}                    # optional: regional torch.compile (off by default)

Relative paths in a stage YAML are taken from the current directory (run from the repository root).
``--set data.max_length=4096`` (YAML-parsed values) overrides any field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from vila_hd import configs
from vila_hd.compat.datasets import inside
from vila_hd.errors import ConfigError, naming_file

# The shipped recipes (package data vila_hd.configs), found the same way in a source tree and after pip install.
CONFIG_ROOT = str(configs.path())


@dataclass
class InitConfig:
    """Where the stage starts: ``model`` (a VILA-HD checkpoint: our format or VILA's, e.g. the previous
    stage's ``final``), or ``ps3`` + ``llm`` (fresh projector), or ``preset`` (random tiny model)."""

    model: str | None = None
    ps3: str | None = None
    llm: str | None = None
    preset: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # VilaHDConfig fields for ps3+llm / preset
    attn_implementation: str | None = None  # sdpa (default), flash_attention_2, flex_attention, eager

    def validate(self) -> None:
        forms = [self.model is not None, self.ps3 is not None or self.llm is not None, self.preset is not None]
        if sum(forms) != 1:
            raise ConfigError("init needs exactly one of: model, ps3 + llm, preset")
        if (self.ps3 is None) != (self.llm is None):
            raise ConfigError("init from base checkpoints needs both ps3 and llm")


@dataclass
class DataConfig:
    registry: str | None = None  # registry YAML
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # inline registry entries
    mixture: str | None = None  # default: every registered dataset once
    max_length: int = 8192  # tokens after image expansion; longer samples are skipped and counted
    packing: bool = False  # pack each micro-batch's samples into rows of max_length (no cross-attention)
    num_workers: int | None = None  # DataLoader workers (None: min(4, the CPU cores this process may use))
    seed: int = 0  # mixture fractions


@dataclass
class LookCloseConfig:
    mode: str | None = None  # after_prompt / after_image (default: the model's)
    num_look_close: int | str | None = None
    num_token_look_close: int | str | None = 10240

    def kwargs(self) -> dict[str, Any]:
        return {"num_look_close": self.num_look_close, "num_token_look_close": self.num_token_look_close}


@dataclass
class LossConfig:
    selection_weight: float = 0.0  # weight of BCE + Dice on selection probabilities for boxed samples


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class BatchConfig:
    micro_batch_size: int = 1  # samples per rank per forward
    global_batch_size: int | None = None  # samples per optimizer step (default: micro x world, no accumulation)


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2
    export_final: bool = True


@dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "vila-hd"
    progress_bar: bool = True
    peak_tflops: float | None = None  # per device; default from the GPU name (H100/H200: 989)


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    vision_tower: bool = False  # LoRA on PS3's linear layers too
    quantize: str | None = None  # "4bit" (QLoRA: needs bitsandbytes and a GPU)


LLM_ATTENTION = ("auto", "segments", "model")  # see vila_hd.train.model_step.use_segment_attention
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig:
    """Regional ``torch.compile``: each transformer block compiled on its own, in place (see train/compile.py)."""

    enabled: bool = False
    backend: str = "inductor"  # any torch.compile backend ("aot_eager" to check without code generation)
    mode: str | None = None  # one of COMPILE_MODES (None: torch's default)
    dynamic: bool | None = None  # None: torch decides (dynamic shapes after the first shape change)
    llm: bool = True  # the LLM's decoder layers
    vision: bool = True  # PS3's trunk blocks
    # Compiled graphs kept per block stack (torch's recompile_limit, process-wide; None: torch's default, 8).
    # A stack's blocks share one entry list; grad / no-grad passes, one-row batches and mask / no-mask
    # batches each take entries, and calls past the limit run eagerly.
    recompile_limit: int | None = None

    def validate(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ConfigError(f"compile.mode must be one of {list(COMPILE_MODES)}, got {self.mode!r}")
        for name in ("enabled", "llm", "vision"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compile.{name} must be true or false, got {getattr(self, name)!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ConfigError(f"compile.dynamic must be true, false or null, got {self.dynamic!r}")
        limit = self.recompile_limit
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ConfigError(f"compile.recompile_limit must be a positive integer or null, got {self.recompile_limit!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"compile.backend must be a backend name, got {self.backend!r}")


@dataclass
class StageConfig:
    stage: str = "stage"
    init: InitConfig = field(default_factory=InitConfig)
    output_dir: str = "outputs/stage"
    trainable: dict[str, float] = field(default_factory=dict)  # part -> learning rate
    data: DataConfig = field(default_factory=DataConfig)
    look_close: LookCloseConfig = field(default_factory=LookCloseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 42
    precision: str = "bf16"  # bf16 | fp32
    gradient_checkpointing: dict[str, bool] = field(default_factory=lambda: {"llm": True, "vision_tower": True})
    # LLM attention in training: auto (segment attention when the LLM runs SDPA), segments, model (its own).
    llm_attention: str = "auto"
    deepspeed: str = "zero2"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig | None = None
    compile: CompileConfig = field(default_factory=CompileConfig)

    def validate(self) -> None:
        from vila_hd.model.parts import PARTS  # the parts the model declares

        self.init.validate()
        unknown = set(self.trainable) - set(PARTS)
        if unknown:
            raise ConfigError(f"trainable: unknown part(s) {sorted(unknown)}; parts: {list(PARTS)}")
        for part, lr in self.trainable.items():
            if lr is not None and lr is not False and (not isinstance(lr, (int, float)) or lr <= 0):
                raise ConfigError(f"trainable.{part}: a learning rate must be a positive number, got {lr!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.data.max_length < 8:
            raise ConfigError(f"data.max_length={self.data.max_length} is too small")
        if self.batch.micro_batch_size < 1:
            raise ConfigError("batch.micro_batch_size must be >= 1")
        if self.lora is not None and self.lora.quantize not in (None, "4bit"):
            raise ConfigError(f"lora.quantize must be null or '4bit', got {self.lora.quantize!r}")
        self.compile.validate()
        if self.llm_attention not in LLM_ATTENTION:
            raise ConfigError(f"llm_attention must be one of {list(LLM_ATTENTION)}, got {self.llm_attention!r}")
        read_deepspeed_config(self.deepspeed)
        refuse_output_in_init(self.output_dir, {f"init.{k}": getattr(self.init, k) for k in ("model", "ps3", "llm")})

    @property
    def learning_rates(self) -> dict[str, float]:
        """Trainable parts and their learning rates (parts set to false/null are frozen)."""
        return {k: float(v) for k, v in self.trainable.items() if v not in (None, False)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading --------------------------------------------------------------------------------------
def refuse_output_in_init(output_dir: str, inits: dict[str, str | None], flag: str = "output_dir") -> None:
    """Refuse an output folder that is, or is inside, a local checkpoint the stage starts from (real paths):
    training would write its checkpoints, logs and final export into that checkpoint."""
    for key, path in inits.items():
        if not path or not os.path.exists(path):
            continue
        if inside(path, output_dir):
            where = "is" if os.path.realpath(output_dir) == os.path.realpath(path) else "is inside"
            raise ConfigError(f"{flag} {output_dir} {where} the checkpoint the stage starts from ({key} {path}); "
                              f"training would write into it: choose another {flag}")


def build_section(cls, data: Any, where: str):
    """Dataclass ``cls`` from a dict, refusing unknown keys (the error names the full key path)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        path = f"{where}.{name}" if where else name
        if sub is not None and (value is not None or name != "lora"):
            kwargs[name] = build_section(sub, value, path)
        elif name == "trainable" and isinstance(value, dict):
            kwargs[name] = {k: _learning_rate(v, f"{path}.{k}") for k, v in value.items()}
        else:
            kwargs[name] = checked_field(cls, name, value, path, hints)
    return cls(**kwargs)


def checked_field(cls: type, name: str, value: Any, where: str, hints: dict[str, Any] | None = None) -> Any:
    """``value`` for the field ``name`` of the dataclass ``cls``: of the field's annotated type and within its
    :data:`LIMITS`; else a ConfigError naming ``where``."""
    hints = typing.get_type_hints(cls) if hints is None else hints
    return _limited(cls, name, typed_value(value, hints[name], where), where)


# --- typed values: one check over every dataclass field, by its annotation -------------------------------
_KINDS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                          type(None): "null"}


def _matches(value: Any, tp: Any, where: str) -> Any:
    """``value`` as a ``tp`` (YAML's ``2e-5`` string read as a float, a list as a tuple), else ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _matches(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        items = args if origin is tuple and args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        return origin(_matches(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict and isinstance(value, dict):
        return {k: _matches(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):
        value = _number(value, where)
    if _is(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _is(value: Any, tp: Any) -> bool:
    if tp is float:
        return type(value) in (int, float) and math.isfinite(value)
    if tp in (int, bool, type(None)):
        return type(value) is tp
    return isinstance(tp, type) and isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def typed_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the field annotation ``tp``: ints are ints (not bools), floats finite numbers,
    bools true/false, strings strings; lists, tuples and mappings item by item. The error names the key."""
    return _matches(value, tp, where)


def _learning_rate(value: Any, where: str) -> Any:
    """A trainable part's learning rate: a positive finite number, or null / false (frozen)."""
    if value is None or value is False:
        return value
    number = _number(value, where)
    if type(number) not in (int, float) or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where}: a learning rate must be a positive finite number (or null/false: frozen), "
                          f"got {value!r}")
    return number


SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1


def _range(text: str, test: Callable[[Any], bool]) -> tuple[str, Callable[[Any], bool]]:
    return text, test


# Field limits beyond the type (None always passes where the type allows it): (class name, field) -> check.
LIMITS: dict[tuple[str, str], tuple[str, Callable[[Any], bool]]] = {
    ("StageConfig", "max_steps"): _range(">= 1", lambda v: v >= 1),
    ("StageConfig", "epochs"): _range("> 0", lambda v: v > 0),
    ("StageConfig", "seed"): _range(f"in 0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX),
    ("PretrainConfig", "max_steps"): _range(">= 1", lambda v: v >= 1),
    ("PretrainConfig", "epochs"): _range("> 0", lambda v: v > 0),
    ("PretrainConfig", "seed"): _range(f"in 0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX),
    ("DataConfig", "num_workers"): _range(">= 0", lambda v: v >= 0),
    ("DataConfig", "seed"): _range(f"in 0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX),
    ("LossConfig", "selection_weight"): _range(">= 0", lambda v: v >= 0),
    ("OptimConfig", "weight_decay"): _range(">= 0", lambda v: v >= 0),
    ("OptimConfig", "eps"): _range("> 0", lambda v: v > 0),
    ("OptimConfig", "warmup_ratio"): _range("in [0, 1]", lambda v: 0 <= v <= 1),
    ("OptimConfig", "warmup_steps"): _range(">= 0", lambda v: v >= 0),
    ("OptimConfig", "min_lr_ratio"): _range("in [0, 1]", lambda v: 0 <= v <= 1),
    ("OptimConfig", "max_grad_norm"): _range(">= 0 (0: no clipping)", lambda v: v >= 0),
    ("OptimConfig", "betas"): _range("in [0, 1)", lambda v: all(0 <= b < 1 for b in v)),
    ("BatchConfig", "micro_batch_size"): _range(">= 1", lambda v: v >= 1),
    ("BatchConfig", "global_batch_size"): _range(">= 1", lambda v: v >= 1),
    ("CheckpointConfig", "every_steps"): _range(">= 1", lambda v: v >= 1),
    ("CheckpointConfig", "keep_last"): _range(">= 0 (0: keep all)", lambda v: v >= 0),
    ("LoggingConfig", "every_steps"): _range(">= 1", lambda v: v >= 1),
    ("LoggingConfig", "peak_tflops"): _range("> 0", lambda v: v > 0),
    ("LoraConfig", "r"): _range(">= 1", lambda v: v >= 1),
    ("LoraConfig", "alpha"): _range(">= 1", lambda v: v >= 1),
    ("LoraConfig", "dropout"): _range("in [0, 1)", lambda v: 0 <= v < 1),
}


def _limited(cls: type, name: str, value: Any, where: str) -> Any:
    limit = LIMITS.get((cls.__name__, name))
    if limit is not None and value is not None and not limit[1](value):
        raise ConfigError(f"{where}: expected a value {limit[0]}, got {value!r}")
    return value


def _number(value: Any, where: str) -> Any:
    """YAML reads ``2e-5`` (no dot) as a string: accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value


_NESTED = {
    (StageConfig, "init"): InitConfig,
    (StageConfig, "data"): DataConfig,
    (StageConfig, "look_close"): LookCloseConfig,
    (StageConfig, "loss"): LossConfig,
    (StageConfig, "optim"): OptimConfig,
    (StageConfig, "batch"): BatchConfig,
    (StageConfig, "checkpoint"): CheckpointConfig,
    (StageConfig, "logging"): LoggingConfig,
    (StageConfig, "lora"): LoraConfig,
    (StageConfig, "compile"): CompileConfig,
}


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def stage_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> StageConfig:
    data = apply_overrides(dict(data or {}), overrides)
    config = build_section(StageConfig, data, "")
    config.validate()
    return config


def load_stage(path: str | os.PathLike, overrides: list[str] | None = None) -> StageConfig:
    """Read a stage YAML (a path, or a shipped recipe's name: :func:`vila_hd.configs.find`) and apply ``--set``
    overrides; errors name the offending key."""
    path = configs.find(path, "stages")
    with open(path) as f, naming_file(path, "recipe"):
        data = yaml.safe_load(f) or {}
    try:
        return stage_from_dict(data, overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None


def deepspeed_config_path(name_or_path: str) -> str:
    """``zero2`` -> ``configs/deepspeed/zero2.json``; paths are returned as they are."""
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_ROOT, "deepspeed", f"{name_or_path}.json")
    if os.path.exists(candidate):
        return candidate
    raise ConfigError(f"deepspeed: {name_or_path!r} is neither a file nor a name in {os.path.dirname(candidate)}")


def read_deepspeed_config(name_or_path: str) -> dict[str, Any]:
    """The DeepSpeed JSON config ``deepspeed`` names (a name in configs/deepspeed/ or a path); a file that is
    not a JSON object is refused with a message naming it."""
    path = deepspeed_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed: {path} is not a DeepSpeed JSON config ({err}); give zero2, zero3, "
                          f"zero3_offload or the path of a JSON file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path} is not a DeepSpeed JSON config (a JSON object); got {type(data).__name__}")
    return data
