"""Training configurations: one dataclass per objective, defaults from the LLM2Vec paper.

A run's settings come, in order of precedence, from command-line flags, a JSON (or YAML, when
PyYAML is installed) file, a named preset shipped in ``llm2vec_fast/training/presets/``, and the
defaults below. Field names follow the official ``llm2vec`` experiment scripts where one exists
(``per_device_train_batch_size``, ``mlm_probability``, ``mask_token_type``, ``loss_scale``, ...), so
its ``train_configs/*.json`` read naturally. Every bad value is reported with the file and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

PRESETS_DIR = Path(__file__).with_name("presets")
OBJECTIVES = ("mntp", "simcse", "supervised")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Settings naming files: always local ones, and models that are a local directory or a Hugging Face hub name.
_LOCAL_PATHS = ("train_files", "output_dir", "resume_from_checkpoint")
_LOCAL_OR_HUB = ("model_name_or_path", "peft_model_name_or_path")
PATH_SETTINGS = _LOCAL_PATHS + _LOCAL_OR_HUB

# MNTP masking per model family, as the official train_configs: Mistral masks 80% of tokens, all
# replaced by the mask token; every other family masks 20% with BERT's 80/10/10 replacement.
MNTP_FAMILY_MASKING = {"mistral": (0.8, "all_mask")}
MNTP_DEFAULT_MASKING = (0.2, "default")


def setting(
    default: Any = dataclasses.MISSING, *, help: str, aliases: tuple[str, ...] = (), factory: Any = dataclasses.MISSING
) -> Any:
    """A config field with its help text (and extra command-line flags) in its metadata, where the CLI reads them."""
    metadata = {"help": help, **({"aliases": list(aliases)} if aliases else {})}
    return field(default=default, default_factory=factory, metadata=metadata)


def overriding(base: type, name: str, default: Any) -> Any:
    """A subclass's new default for the field `name` of `base`, keeping the field's help."""
    inherited = next(f for f in dataclasses.fields(base) if f.name == name)
    return field(default=default, metadata=inherited.metadata)


@dataclass(kw_only=True)
class TrainConfig:
    """Settings shared by every objective."""

    model_name_or_path: str = setting(help="base model (local directory or Hugging Face name)", aliases=("--model",))
    train_files: list[str] = setting(
        help="text files (mntp, simcse: one example per line) or JSONL files/directories "
        "(supervised: one data set per file)",
        aliases=("--data",),
    )
    output_dir: str = setting(help="where the adapter, logs and checkpoints go", aliases=("--output",))
    peft_model_name_or_path: str | None = setting(
        None, help="adapter merged into the base before training (the MNTP output for simcse/supervised)"
    )
    max_seq_length: int = setting(
        512, help="tokens per sequence (longer texts are truncated; mntp 'concat' blocks have exactly this length)"
    )
    per_device_train_batch_size: int = setting(
        32, help="sequences (mntp) or examples (contrastive) per process and micro-batch"
    )
    gradient_accumulation_steps: int = setting(
        1, help="micro-batches per optimizer step (contrastive negatives stay within a micro-batch)"
    )
    max_steps: int = setting(1000, help="optimizer steps of the run (the learning-rate schedule spans them)")
    stop_after_steps: int | None = setting(
        None, help="end this invocation at this step, e.g. to split a long job; resume later with --resume latest"
    )
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = setting(
        "constant",
        help="after warmup: constant (closest to the official runs, which stop long before their decay "
        "ends), linear or cosine",
    )
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU (LoRA weights stay float32)"
    )
    gradient_checkpointing: bool = True
    attn_implementation: Literal["llm2vec_fast", "sdpa", "eager"] = setting(
        "llm2vec_fast",
        help="llm2vec_fast = packed batches on our kernels; sdpa/eager = HF attention on padded batches (reference)",
    )
    attention_backend: Literal["auto", "cuda", "triton", "cpu", "reference"] = setting(
        "auto", help="force one llm2vec_fast kernel backend", aliases=("--backend",)
    )
    distributed_strategy: Literal["ddp", "fsdp"] = setting(
        "ddp",
        help="with several processes: ddp = a full model per process, fsdp = weights, gradients and optimizer "
        "state sharded across processes (FSDP2; 16-bit weights compute in their dtype, gradients reduce "
        "in float32)",
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    save_steps: int = 200
    save_total_limit: int | None = setting(None, help="keep only this many checkpoints")
    resume_from_checkpoint: str | None = setting(
        None, help="'latest' (newest intact checkpoint in output_dir) or a checkpoint directory", aliases=("--resume",)
    )
    overwrite_output_dir: bool = setting(
        False,
        help="let a fresh run replace an earlier run's checkpoints, adapter and logs in output_dir (refused otherwise)",
    )
    validate_data: bool = setting(
        True, help="parse every JSONL record before training starts (errors name file and line)"
    )
    disable_tqdm: bool = False
    device: str | None = setting(
        None, help="cpu, cuda or cuda:N (default: CUDA when available; under torchrun, GPU LOCAL_RANK)"
    )

    objective: typing.ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, **dataclasses.asdict(self)}

    @property
    def last_step(self) -> int:
        """The step this invocation stops after: ``max_steps``, or ``stop_after_steps`` when that comes first."""
        return min(self.max_steps, self.stop_after_steps or self.max_steps)

    def with_resolved_paths(self) -> TrainConfig:
        """A copy naming local files by absolute path (see `resolve_paths`)."""
        return dataclasses.replace(self, **resolve_paths({name: getattr(self, name) for name in PATH_SETTINGS}))


@dataclass(kw_only=True)
class MNTPConfig(TrainConfig):
    """Masked next-token prediction (paper: 1000 steps, batch 32, 512 tokens, lr 5e-5)."""

    mlm_probability: float | None = setting(
        None, help="masking probability (default per family: mistral 0.8, others 0.2)"
    )
    data_collator_type: Literal["default", "all_mask"] | None = setting(
        None, help="default = 80/10/10 mask/random/keep, all_mask = 100% mask token (default per family)"
    )
    mask_token_type: Literal["blank", "eos", "mask"] = setting(
        "blank", help="blank = '_', eos = the EOS token, mask = a new '<mask>' token (its embedding stays untrained)"
    )
    data_layout: Literal["concat", "lines"] = setting(
        "concat",
        help="concat = lines concatenated and cut into max_seq_length blocks (LLM2Vec), lines = one sequence per line",
    )
    max_tokens_per_batch: int | None = setting(
        None, help="token budget per micro-batch instead of a sequence count (mntp)"
    )
    lm_head: Literal["freeze", "train"] = setting(
        "freeze",
        help="freeze (default) or train it too, saved as lm_head.safetensors (the official script trains "
        "it and discards it)",
    )
    loss_chunk_size: int = setting(4096, help="masked positions per LM-head chunk (memory: chunk x vocabulary floats)")

    objective: typing.ClassVar[str] = "mntp"

    def masking_for(self, model_type: str) -> tuple[float, str]:
        """``(mlm_probability, data_collator_type)``, filling unset values from the model family."""
        probability, collator = MNTP_FAMILY_MASKING.get(model_type, MNTP_DEFAULT_MASKING)
        return (
            probability if self.mlm_probability is None else self.mlm_probability,
            collator if self.data_collator_type is None else self.data_collator_type,
        )


@dataclass(kw_only=True)
class ContrastiveConfig(TrainConfig):
    """Settings of both contrastive objectives."""

    pooling_mode: Literal["mean", "weighted_mean", "eos_token", "last_token", "bos_token"] = setting(
        "mean", help="how token states become the sequence embedding (saved to llm2vec_config.json)"
    )
    skip_instruction: bool = setting(True, help="leave BOS and the instruction out of pooling (LLM2Vec's embed_mask)")
    text_template: str | None = setting(
        None,
        help="chat template applied to every text, e.g. '[INST] {} [/INST]' as the official run for "
        "Mistral-7B-Instruct",
    )
    loss_scale: float = setting(50.0, help="inverse temperature of the contrastive loss (simcse 20, supervised 50)")


@dataclass(kw_only=True)
class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE (paper: 1000 steps, batch 128, 128 tokens, lr 3e-5, dropout 0.3, scale 20)."""

    per_device_train_batch_size: int = overriding(TrainConfig, "per_device_train_batch_size", 128)
    max_seq_length: int = overriding(TrainConfig, "max_seq_length", 128)
    learning_rate: float = 3e-5
    loss_scale: float = overriding(ContrastiveConfig, "loss_scale", 20.0)
    simcse_dropout: float = setting(
        0.3,
        help="dropout making the two views differ (on the attention output with llm2vec_fast, "
        "on the attention probabilities with sdpa/eager)",
    )

    objective: typing.ClassVar[str] = "simcse"


@dataclass(kw_only=True)
class SupervisedConfig(ContrastiveConfig):
    """Supervised contrastive (paper: 1000 steps, batch 64 per GPU, 512 tokens, lr 2e-4, warmup 300, scale 50)."""

    per_device_train_batch_size: int = overriding(TrainConfig, "per_device_train_batch_size", 64)
    learning_rate: float = 2e-4
    warmup_steps: int = 300
    instructions: dict[str, str | list[str]] = setting(
        help="data set (file stem) -> instruction, or a list cycled through by line", factory=dict
    )

    objective: typing.ClassVar[str] = "supervised"


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {
    "mntp": MNTPConfig,
    "simcse": SimCSEConfig,
    "supervised": SupervisedConfig,
}


_POSITIVE = (
    "max_seq_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "save_steps",
    "lora_r",
    "lora_alpha",
    "loss_chunk_size",
    "max_tokens_per_batch",
    "save_total_limit",
    "stop_after_steps",
    "learning_rate",
    "loss_scale",
)
_RANGES: dict[str, tuple[Any, str]] = {
    **{name: (lambda v: v > 0, "positive") for name in _POSITIVE},
    **{
        name: (lambda v: v >= 0, ">= 0")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon", "seed")
    },
    **{
        name: (lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("lora_dropout", "simcse_dropout", "adam_beta1", "adam_beta2")
    },
    "mlm_probability": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "text_template": (lambda v: v.count("{}") == 1, "a string holding '{}' (where the text goes) exactly once"),
    "train_files": (lambda v: len(v) > 0, "at least one file"),
}


def _resolve(name: str, local: bool) -> str:
    if name == "latest" or not (local or Path(name).exists()):
        return name  # resume_from_checkpoint="latest", or a hub model name
    return str(Path(name).resolve())


def resolve_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with its local paths absolute and symlink-free; hub names (no such local path) stay as given.

    What a run writes (``train_config.json``, checkpoints, the adapter's ``base_model_name_or_path``)
    then still works from another working directory, and ``rp``, ``./rp/`` and ``/abs/rp`` compare equal.
    """
    resolved = dict(settings)
    for name in PATH_SETTINGS:
        value, local = settings.get(name), name in _LOCAL_PATHS
        if isinstance(value, str):
            resolved[name] = _resolve(value, local)
        elif isinstance(value, list):
            resolved[name] = [_resolve(item, local) for item in value]
    return resolved


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _check_value(cls: type[TrainConfig], name: str, value: Any, source: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    if name == "train_files" and isinstance(value, str):
        value = [value]
    if not _matches(value, hint):
        raise ValueError(f"{source}: {name!r} must be {_type_name(hint)}, got {value!r}")
    if type(value) is int and float in (hint, *typing.get_args(hint)):
        value = float(value)
    if value is not None and name in _RANGES:
        accepted, description = _RANGES[name]
        if not accepted(value):
            raise ValueError(f"{source}: {name!r} must be {description}, got {value!r}")
    return value


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ValueError(f"{path}: reading YAML configs needs PyYAML (pip install pyyaml); or use JSON") from error
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of settings, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (file names without extension)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def resolve_config_file(name_or_path: str) -> Path:
    """A config file path, or the shipped preset of that name."""
    path = Path(name_or_path)
    if path.suffix or path.exists():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return preset
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(preset_names())}"
    )


def build_config(objective: str, sources: list[tuple[str, dict[str, Any]]]) -> TrainConfig:
    """Merge ``(source_name, mapping)`` pairs (later ones win) into the config of `objective`, checking every key."""
    if objective not in CONFIG_CLASSES:
        raise ValueError(f"unknown training objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    cls = CONFIG_CLASSES[objective]
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for source, mapping in sources:
        for key, value in mapping.items():
            if key == "objective":
                if value != objective:
                    raise ValueError(f"{source}: this config is for objective {value!r}, not {objective!r}")
                continue
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{source}: unknown setting {key!r} for objective {objective!r}{hint}")
            values[key] = _check_value(cls, key, value, source)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise ValueError(f"missing required setting(s) for {objective}: {', '.join(missing)}")
    return cls(**values)


def load_config(objective: str, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of `objective` from an optional file or preset name plus overrides (e.g. CLI flags).

    An override of None sets a nullable setting to None, clearing what the file set (``--stop-after-steps none``).
    """
    sources: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        path = resolve_config_file(config_file)
        sources.append((str(path), _read_mapping(path)))
    if overrides:
        sources.append(("command line", dict(overrides)))
    return build_config(objective, sources)
