"""Loading and saving LLM2Vec encoders: plain checkpoints, MNTP adapter directories, a second adapter.

A model source is a directory or hub id of one of three kinds:

- a checkpoint: ``config.json`` and weights;
- an adapter directory (our MNTP output): ``adapter_config.json`` and adapter weights, no ``config.json``;
- a released LLM2Vec ``-mntp`` repository: an adapter directory that also holds the base model's
  ``config.json`` (whose ``_name_or_path`` names the hub base and so selects the chat template, and
  whose ``auto_map`` points at custom code that is never run) and the tokenizer.

An adapter directory is loaded as the official library does: the base named by its
``adapter_config.json`` (itself any kind of source), then the adapter merged into it; except an
encoder's adapter (one with ``llm2vec_config.json``: saved by ``save``, or a SimCSE/supervised output),
which is kept apart as a ``peft_model_name_or_path`` is. The base's weights are loaded by us, never
through transformers' PEFT integration, so that the model saves again with any peft release.
``save`` writes what ``from_pretrained`` reloads to identical embeddings.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .hf import ATTENTION_NAME, check_supported_model, register, route_attention
from .runtime import check_backend

CONFIG_NAME = "llm2vec_config.json"
"""Encoder settings saved next to a model, in the official layout."""
ENCODER_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
ENCODER_DEFAULTS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}
ADAPTER_CONFIG_NAME = "adapter_config.json"
_MAX_ADAPTER_CHAIN = 8


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within the block, unless `verbose`: no transformers logs below errors (its LOAD REPORT is a warning), no
    transformers or huggingface_hub progress bars (loading weights, writing shards), no deprecation warnings.

    Everything is restored afterwards: users who import us keep their own settings outside our calls.
    """
    if verbose:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars_shown, hub_bars_hidden = (
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
    )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_shown:
            hf_logging.enable_progress_bar()
        if not hub_bars_hidden:
            enable_progress_bars()


def _looks_local(source: str) -> bool:
    """Whether `source` is meant as a local path (and must not be looked up on the hub)."""
    if os.path.isabs(source) or source.startswith(("./", "../", "~")) or source in (".", ".."):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def resolve_source(source: str | os.PathLike) -> str:
    """`source` as an absolute path if it is local (FileNotFoundError if it is missing), else the hub id unchanged."""
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        return os.path.abspath(source)
    if _looks_local(source):
        raise FileNotFoundError(f"model path {source} does not exist")
    return source


def read_json(path: str) -> dict:
    """A JSON object from `path`, or a one-line ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _source_file(source: str, name: str) -> str | None:
    """The local path of file `name` of a model source (a download for a hub id), or None if it has none."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    return cached_file(source, name, _raise_exceptions_for_missing_entries=False)


def _adapter_base(source: str) -> str | None:
    """The base an adapter directory was trained on (resolved: relative paths against the working directory,
    then against the adapter directory), or None if `source` is not an adapter directory."""
    adapter_config = _source_file(source, ADAPTER_CONFIG_NAME)
    if adapter_config is None:
        return None
    base = read_json(adapter_config).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{adapter_config}: no base_model_name_or_path")
    beside = os.path.join(source, base)
    if os.path.isdir(source) and not os.path.isabs(base) and not os.path.isdir(base) and os.path.isdir(beside):
        base = beside
    return resolve_source(base)


def _check_safetensors(directory: str) -> None:
    """A one-line ValueError naming a corrupt or truncated ``*.safetensors`` file of a local directory."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, "pt"):
                    pass
            except SafetensorError as error:
                raise ValueError(f"{path}: corrupt or truncated safetensors file ({error})") from None


def _template_name(source: str) -> str:
    """The name the official encoder matches chat templates against: a local directory's ``config.json``
    ``_name_or_path``; for a hub id, the id, or for a hub adapter repository, its base's name."""
    if os.path.isdir(source):
        config_file = os.path.join(source, "config.json")
        if os.path.isfile(config_file):
            return str(read_json(config_file).get("_name_or_path", ""))
    base = _adapter_base(source)
    if base is None:
        return source
    config_file = _source_file(source, "config.json")  # a released -mntp repository names its hub base here
    if config_file is not None and "_name_or_path" in (config := read_json(config_file)):
        return str(config["_name_or_path"])
    return _template_name(base)


def _adapter_chain(source: str) -> list[str]:
    """`source` and the adapter directories under it down to the checkpoint: ``[checkpoint, adapter, ...]``."""
    chain = [source]
    while (base := _adapter_base(chain[-1])) is not None:
        if base in chain or len(chain) > _MAX_ADAPTER_CHAIN:
            raise ValueError(f"{chain[-1]}: adapter base chain loops or is too long: {' -> '.join(chain + [base])}")
        chain.append(base)
    return chain[::-1]


def _is_encoder_adapter(source: str) -> bool:
    """Whether adapter directory `source` is an encoder's adapter (one ``LLM2Vec.save`` wrote, or a SimCSE or
    supervised output: they hold ``llm2vec_config.json``, MNTP outputs do not). Given alone as the base, it
    is applied as ``peft_model_name_or_path`` is (on its base, kept apart unless ``merge_peft``), so that a
    saved encoder reloads exactly."""
    return os.path.isfile(os.path.join(source, CONFIG_NAME))


def _load_checkpoint(source: str, hf_kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    _check_safetensors(source)
    config = AutoConfig.from_pretrained(source)
    check_supported_model(config)
    return AutoModel.from_pretrained(source, config=config, **hf_kwargs)


def _apply_adapter(model: nn.Module, adapter: str, merge: bool, model_source: str | None = None) -> nn.Module:
    """`model` with the adapter of `adapter`, merged or kept apart. A kept adapter records `model_source`
    (the source that reloads `model` as it is) as its base, so that ``save`` writes where its base is."""
    from peft import PeftModel

    _check_safetensors(adapter)
    with_adapter = PeftModel.from_pretrained(model, adapter)
    if merge:
        return with_adapter.merge_and_unload()
    with_adapter.peft_config["default"].base_model_name_or_path = model_source
    return with_adapter


def _normalise_hf_kwargs(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    hf_kwargs = dict(hf_kwargs)
    if hf_kwargs.get("attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
        raise ValueError(
            f"LLM2Vec always runs attention through {ATTENTION_NAME!r}; got attn_implementation="
            f"{hf_kwargs['attn_implementation']!r} (use attention_backend= to choose the kernel)"
        )
    hf_kwargs["attn_implementation"] = ATTENTION_NAME
    if "torch_dtype" in hf_kwargs:  # the official spelling; transformers 5 calls it dtype
        hf_kwargs.setdefault("dtype", hf_kwargs.pop("torch_dtype"))
    hf_kwargs.setdefault("dtype", torch.float32)  # the official default (transformers 4.44 loads float32)
    return hf_kwargs


def _encoder_settings(settings_dir: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then ``llm2vec_config.json`` in `settings_dir` (if local and present), then the explicit settings."""
    settings = dict(ENCODER_DEFAULTS)
    saved = os.path.join(settings_dir, CONFIG_NAME)
    if os.path.isfile(saved):
        settings.update({k: v for k, v in read_json(saved).items() if k in ENCODER_KEYS})
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings


def load_encoder_parts(
    base_model_name_or_path: str | os.PathLike,
    peft_model_name_or_path: str | os.PathLike | None,
    merge_peft: bool,
    enable_bidirectional: bool,
    explicit_settings: dict[str, Any],
    attention_backend: str | None,
    hf_kwargs: dict[str, Any],
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The model, tokenizer and encoder settings ``LLM2Vec.from_pretrained`` builds an encoder from."""
    from transformers import AutoTokenizer

    paths = {"base_model_name_or_path": base_model_name_or_path, "peft_model_name_or_path": peft_model_name_or_path}
    for name, path in paths.items():
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path or model name, got {type(path).__name__}")
    if attention_backend is not None and not isinstance(attention_backend, str):
        raise TypeError(f"attention_backend must be a backend name or None, got {type(attention_backend).__name__}")
    check_backend(attention_backend, None)
    hf_kwargs = _normalise_hf_kwargs(hf_kwargs)
    base = resolve_source(base_model_name_or_path)
    peft_source = None if peft_model_name_or_path is None else resolve_source(peft_model_name_or_path)

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    chain = _adapter_chain(base)
    if peft_source is None and len(chain) > 1 and _is_encoder_adapter(chain[-1]):
        peft_source = chain.pop()
    checkpoint, *adapters = chain
    register()
    model = _load_checkpoint(checkpoint, hf_kwargs)
    for adapter in adapters:  # MNTP (and what it was trained on): merged, as the official does
        model = _apply_adapter(model, adapter, merge=True)
    model.config._name_or_path = _template_name(chain[-1])
    if peft_source is not None:
        model = _apply_adapter(model, peft_source, merge=merge_peft, model_source=chain[-1])
    route_attention(model, causal=not enable_bidirectional, backend=attention_backend)
    settings = _encoder_settings(peft_source or base, explicit_settings)
    return model, tokenizer, settings


def save_encoder(encoder: Any, output_path: str | os.PathLike, merge_before_save: bool, save_config: bool) -> None:
    """Write `encoder` (an ``LLM2Vec``) so that ``from_pretrained(output_path)`` gives the same embeddings.

    A model with an adapter kept apart is saved as that adapter, recording as its base the source the
    encoder's base was loaded from; a merged or plain model is saved whole, with ``_name_or_path`` kept
    in ``config.json`` (transformers 5 drops it) because it selects the chat template.
    """
    from peft import PeftModel

    output_path = os.path.abspath(os.path.expanduser(str(output_path)))
    if merge_before_save and isinstance(encoder.model, PeftModel):
        encoder.model = encoder.model.merge_and_unload()
    model = encoder.model
    model.save_pretrained(output_path)
    if not isinstance(model, PeftModel):
        _keep_template_name(output_path, model.config._name_or_path)
    encoder.tokenizer.save_pretrained(output_path)
    if save_config:
        with open(os.path.join(output_path, CONFIG_NAME), "w") as handle:
            json.dump({key: getattr(encoder, key) for key in ENCODER_KEYS}, handle, indent=4)


def _keep_template_name(directory: str, name: str) -> None:
    config_file = os.path.join(directory, "config.json")
    config = read_json(config_file)
    config["_name_or_path"] = name
    with open(config_file, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
