"""Regenerate the llm2vec 0.2.3 parity fixtures: tiny models and the official library's embeddings.

The committed fixtures let CI compare ``llm2vec_fast.LLM2Vec`` with the official encoder without
installing it. To rebuild them (from the repository root):

    python -m venv /work/oracle
    /work/oracle/bin/pip install torch==2.13.0 && /work/oracle/bin/pip install llm2vec==0.2.3
    python tests/data/llm2vec_oracle/make_oracle.py --oracle-python /work/oracle/bin/python

Stage 1 (this interpreter, transformers 5.x) writes a tiny random Llama and Mistral base model per
directory (``llm2vec_fast.tiny`` weights, safetensors, ``tokenizer.json``) in a form transformers
4.44 also loads, and on each base the released checkpoint layouts (tests/checkpoint_layouts.py):
``<family>_mntp/`` (an ``-mntp`` repository: base config naming the hub base, ``auto_map``, tokenizer,
adapter, no weights), ``<family>_supervised/`` and ``<family>_simcse/`` (adapters only). Their
adapter configs name the base as ``../<family>``, relative, as a local replica of a hub name.
Stage 2 runs this file again under the oracle interpreter (``--stage oracle``): the official
``llm2vec.LLM2Vec`` encodes every case of ``CASES`` into ``<family>/embeddings.safetensors`` and
every case of ``CHECKPOINT_CASES`` into ``checkpoints.safetensors`` (``<family>/<case>`` keys);
``cases.json`` and ``checkpoint_cases.json`` record the cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ("llama", "mistral")
HUB_BASES = {"llama": "meta-llama/Meta-Llama-3-8B-Instruct", "mistral": "mistralai/Mistral-7B-Instruct-v0.2"}
"""What each family's ``-mntp`` config.json names as ``_name_or_path``: it selects the chat template."""
ADAPTER_SEEDS = {"mntp": 101, "supervised": 102, "simcse": 103}

SENTENCES = [
    "A man is playing a guitar on the street.",
    "Paris",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Flash attention computes exact attention without materialising the score matrix.",
    "Padding tokens carry no information.",
]
PAIRS = [
    ["Retrieve documents that answer the question:", "What is the capital of France?"],
    ["Given a claim, find documents that refute it:", "The earth is flat."],
    ["", "A woman is slicing an onion in the kitchen."],
    ["Represent the sentence:", "Masked next token prediction adapts the model."],
]
LONG_PAIRS = [
    ["Summarise:", "Contrastive learning pulls paired sentences together and pushes others apart, " * 3],
    ["", "Decoder-only language models can become strong text encoders with bidirectional attention. " * 2],
    ["Find similar:", "short text"],
]


def _case(name: str, inputs: list, **settings) -> dict:
    return {"name": name, "inputs": inputs, "settings": settings}


CASES = [
    *(
        _case(f"plain_{mode}", SENTENCES, pooling_mode=mode)
        for mode in ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
    ),
    *(_case(f"pairs_{mode}", PAIRS, pooling_mode=mode) for mode in ("mean", "weighted_mean", "eos_token")),
    _case("pairs_mean_keep_instruction", PAIRS, pooling_mode="mean", skip_instruction=False),
    _case("truncated_mean", LONG_PAIRS, pooling_mode="mean", max_length=24, doc_max_length=12),
    _case("truncated_eos", LONG_PAIRS, pooling_mode="eos_token", max_length=20, doc_max_length=400),
    _case("causal_mean", PAIRS, pooling_mode="mean", enable_bidirectional=False),
]


def _checkpoint_case(name: str, inputs: list, peft: str | None, **settings) -> dict:
    return {"name": name, "inputs": inputs, "peft": peft, "settings": settings}


CHECKPOINT_CASES = [
    _checkpoint_case("mntp_mean", SENTENCES, None, pooling_mode="mean"),
    _checkpoint_case("supervised_mean", PAIRS, "supervised", pooling_mode="mean"),
    _checkpoint_case("supervised_merged_mean", PAIRS, "supervised", pooling_mode="mean", merge_peft=True),
    _checkpoint_case("supervised_eos", PAIRS, "supervised", pooling_mode="eos_token"),
    _checkpoint_case("simcse_weighted_mean", SENTENCES, "simcse", pooling_mode="weighted_mean"),
]
"""Cases on ``<family>_mntp`` as the base, with ``<family>_<peft>`` as the second adapter."""


def write_checkpoint_layouts() -> None:
    """Stage 1, after the bases: the released layouts on each base (no base weights of their own)."""
    sys.path.insert(0, str(HERE.parents[1]))  # tests/, for checkpoint_layouts
    from checkpoint_layouts import write_adapter, write_mntp_repository

    for family in FAMILIES:
        base_dir = HERE / family
        recorded = f"../{family}"
        write_mntp_repository(HERE / f"{family}_mntp", base_dir, HUB_BASES[family], recorded, ADAPTER_SEEDS["mntp"])
        for kind in ("supervised", "simcse"):
            write_adapter(HERE / f"{family}_{kind}", base_dir, recorded, ADAPTER_SEEDS[kind])
    (HERE / "checkpoint_cases.json").write_text(json.dumps(CHECKPOINT_CASES, indent=1) + "\n")


def write_models() -> None:
    """Stage 1: tiny base models and tokenizers, with config keys transformers 4.44 understands too."""
    from llm2vec_fast.tiny import build_tiny_model

    for seed, family in enumerate(FAMILIES):
        model, tokenizer = build_tiny_model(family, seed=seed)
        directory = HERE / family
        model.model.save_pretrained(directory)  # base model only: what LLM2Vec loads
        tokenizer.save_pretrained(directory)
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        rope = config.get("rope_parameters") or {}
        config.update(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None, torch_dtype="float32")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        vocab_file = directory / "tokenizer.json"
        vocab = json.loads(vocab_file.read_text())  # merges as "a b" strings: tokenizers < 0.20 (transformers 4.44)
        vocab["model"]["merges"] = [
            " ".join(pair) if isinstance(pair, list) else pair for pair in vocab["model"]["merges"]
        ]
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        tokenizer_file = directory / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_file.read_text())
        tokenizer_config.update(
            tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"]
        )
        tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    (HERE / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n")


def run_oracle() -> None:
    """Stage 2 (under llm2vec 0.2.3): the official embeddings of every case."""
    import torch
    from llm2vec import LLM2Vec
    from safetensors.torch import save_file

    for family in FAMILIES:
        embeddings = {}
        for case in CASES:
            settings = dict(case["settings"])
            encoder = LLM2Vec.from_pretrained(str(HERE / family), torch_dtype=torch.float32, **settings)
            embeddings[case["name"]] = encoder.encode(
                case["inputs"], batch_size=3, show_progress_bar=False, convert_to_tensor=True
            ).contiguous()
        save_file(embeddings, str(HERE / family / "embeddings.safetensors"))
        print(f"{family}: {len(embeddings)} cases written")
    run_checkpoint_oracle()


def run_checkpoint_oracle() -> None:
    """Stage 2, the released layouts: ``LLM2Vec.from_pretrained(<family>_mntp, peft_model_name_or_path=...)``.

    transformers 4.44 resolves an adapter's ``base_model_name_or_path`` against the working directory,
    so each family runs from inside its ``-mntp`` directory, where ``../<family>`` is the base.
    """
    import os

    import torch
    from llm2vec import LLM2Vec
    from safetensors.torch import save_file

    embeddings = {}
    for family in FAMILIES:
        os.chdir(HERE / f"{family}_mntp")
        for case in CHECKPOINT_CASES:
            peft = case["peft"] and str(HERE / f"{family}_{case['peft']}")
            encoder = LLM2Vec.from_pretrained(
                str(HERE / f"{family}_mntp"),
                peft_model_name_or_path=peft,
                torch_dtype=torch.float32,
                **case["settings"],
            )
            embeddings[f"{family}/{case['name']}"] = encoder.encode(
                case["inputs"], batch_size=3, show_progress_bar=False, convert_to_tensor=True
            ).contiguous()
    save_file(embeddings, str(HERE / "checkpoints.safetensors"))
    print(f"released layouts: {len(embeddings)} cases written")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "oracle"), default="all")
    parser.add_argument("--oracle-python", default="/work/oracle/bin/python", help="interpreter with llm2vec==0.2.3")
    args = parser.parse_args()
    if args.stage == "oracle":
        run_oracle()
        return
    write_models()
    write_checkpoint_layouts()
    subprocess.run([args.oracle_python, __file__, "--stage", "oracle"], check=True)


if __name__ == "__main__":
    sys.exit(main())
