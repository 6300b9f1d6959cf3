"""Local replicas of the released LLM2Vec checkpoint layouts, built from tiny models.

A McGill-NLP ``-mntp`` repository holds the base model's ``config.json`` (``_name_or_path`` naming the
hub base, an ``auto_map`` to custom encoder code), the tokenizer and a LoRA adapter, but no base
weights; ``-supervised`` and ``-unsup-simcse`` repositories hold only an adapter. Used by the tests and
by ``tests/data/llm2vec_oracle/make_oracle.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUSTOM_CODE = "modeling_llama_encoder.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_TRAP = 'raise RuntimeError("the repository\'s custom encoder code must never run")\n'


def write_adapter(directory: Path, base_dir: Path, recorded_base: str, seed: int) -> Path:
    """A random (non-zero) rank-4 LoRA on every projection of the base in `base_dir`; its
    ``adapter_config.json`` names `recorded_base` as the base, as the released adapters name the hub base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = get_peft_model(base, lora)
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:  # small updates, like trained ones: the base model still matters
                parameter.data.mul_(0.2)
    adapter.save_pretrained(directory)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = recorded_base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "README.md").unlink(missing_ok=True)
    return directory


def write_mntp_repository(directory: Path, base_dir: Path, hub_name: str, recorded_base: str, seed: int) -> Path:
    """The ``-mntp`` layout: base config (``_name_or_path`` = `hub_name`, an ``auto_map`` to code that raises
    if run), the base's tokenizer files and an adapter, no base weights."""
    write_adapter(directory, base_dir, recorded_base, seed)
    config = json.loads((base_dir / "config.json").read_text())
    config.update(_name_or_path=hub_name, auto_map={"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, directory / name)
    (directory / CUSTOM_CODE).write_text(_TRAP)
    return directory
