"""Regenerate the llm2vec 0.2.3 parity fixtures: tiny models and the official library's embeddings.

The committed fixtures let CI compare ``llm2vec_fast.LLM2Vec`` with the official encoder without
installing it. To rebuild them (from the repository root):

    python -m venv /work/oracle
    /work/oracle/bin/pip install torch==2.13.0 && /work/oracle/bin/pip install llm2vec==0.2.3
    python tests/data/llm2vec_oracle/make_oracle.py --oracle-python /work/oracle/bin/python

Stage 1 (this interpreter, transformers 5.x) writes a tiny random Llama and Mistral base model per
directory (``llm2vec_fast.tiny`` weights, safetensors, ``tokenizer.json``) in a form transformers
4.44 also loads. Stage 2 runs this file again under the oracle interpreter (``--stage oracle``): the
official ``llm2vec.LLM2Vec`` encodes every case of ``CASES`` and the embeddings go to
``<family>/embeddings.safetensors``; ``cases.json`` records the cases.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ("llama", "mistral")

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
    *(_case(f"plain_{mode}", SENTENCES, pooling_mode=mode) for mode in
      ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")),
    *(_case(f"pairs_{mode}", PAIRS, pooling_mode=mode) for mode in ("mean", "weighted_mean", "eos_token")),
    _case("pairs_mean_keep_instruction", PAIRS, pooling_mode="mean", skip_instruction=False),
    _case("truncated_mean", LONG_PAIRS, pooling_mode="mean", max_length=24, doc_max_length=12),
    _case("truncated_eos", LONG_PAIRS, pooling_mode="eos_token", max_length=20, doc_max_length=400),
    _case("causal_mean", PAIRS, pooling_mode="mean", enable_bidirectional=False),
]


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
        vocab["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in vocab["model"]["merges"]]
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        tokenizer_file = directory / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_file.read_text())
        tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "oracle"), default="all")
    parser.add_argument("--oracle-python", default="/work/oracle/bin/python", help="interpreter with llm2vec==0.2.3")
    args = parser.parse_args()
    if args.stage == "oracle":
        run_oracle()
        return
    write_models()
    subprocess.run([args.oracle_python, __file__, "--stage", "oracle"], check=True)


if __name__ == "__main__":
    sys.exit(main())
