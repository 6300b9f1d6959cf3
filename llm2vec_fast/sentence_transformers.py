"""sentence-transformers integration: a ``SentenceTransformer`` whose single module is our ``LLM2Vec``.

    from sentence_transformers import SentenceTransformer
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.sentence_transformers import LLM2VecModule

    st = SentenceTransformer(modules=[LLM2VecModule(LLM2Vec.from_pretrained(path))])
    st.encode(["A sentence."], prompt="Retrieve documents:")   # prompt = LLM2Vec instruction
    st.save(out_dir); SentenceTransformer(out_dir)              # reloads through LLM2Vec.from_pretrained

The vectors are the encoder's own (same tokenization, instruction handling, packing and pooling):
a prompt given to ``encode`` is the LLM2Vec instruction (attended to, left out of mean pooling
when ``skip_instruction``), and ``[instruction, text]`` pairs are accepted as inputs too; named
prompts (``prompts={"query": ...}``, ``prompt_name="query"``) are saved with the model.
Training: ``forward`` runs under autograd in the module's mode (dropout in ``train()``), so
``SentenceTransformerTrainer`` trains a LoRA put on the encoder with ``peft.get_peft_model``, and its
training ``prompts`` are instructions too. Needs sentence-transformers >= 5.4 (``preprocess``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .encoder import LLM2Vec, check_positive_int, to_pairs
from .hf import PackedBatch, pack_sequences

PACKED_KEYS = ("input_ids", "position_ids", "cu_seqlens", "indices")
"""The :class:`~llm2vec_fast.hf.PackedBatch` tensors a batch's features carry (no padded tensor is built)."""

try:  # sentence-transformers >= 5.4: prompts reach preprocess() apart from the texts
    from sentence_transformers.base.modules import InputModule
except ImportError as error:  # older ones prepend the prompt to each text: it would be pooled as text
    raise ImportError(
        "llm2vec_fast.sentence_transformers needs sentence-transformers>=5.4: "
        "pip install 'llm2vec-fast[sentence-transformers]'"
    ) from error


class LLM2VecModule(InputModule):
    """Input module that tokenizes and embeds with an :class:`~llm2vec_fast.LLM2Vec` encoder."""

    save_in_root = True

    def __init__(self, encoder: LLM2Vec):
        super().__init__()
        if not isinstance(encoder, LLM2Vec):
            raise TypeError(f"LLM2VecModule wraps an llm2vec_fast.LLM2Vec, got {type(encoder).__name__}")
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.encoder.max_length = check_positive_int("max_seq_length", value)

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder.model.config.hidden_size

    def get_embedding_dimension(self) -> int:
        return self.get_sentence_embedding_dimension()

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Tensor]:
        """The texts' tokens packed end to end (:data:`PACKED_KEYS`) and each one's ``instruction_lengths``."""
        ids, instruction_lengths = self.encoder.tokenize_pairs(to_pairs(list(inputs), prompt))
        packed = pack_sequences(ids)
        features = {key: getattr(packed, key) for key in PACKED_KEYS}
        features["instruction_lengths"] = torch.tensor(instruction_lengths, dtype=torch.long)
        return features

    def forward(self, features: dict[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:
        cu_seqlens = features["cu_seqlens"]
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        packed = PackedBatch(
            **{key: features[key] for key in PACKED_KEYS},
            max_seqlen=longest,
            batch_size=cu_seqlens.numel() - 1,
            seqlen=longest,
        )
        features["sentence_embedding"] = self.encoder.embed_packed(packed, features["instruction_lengths"])
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.encoder.save(output_path)

    @classmethod
    def load(
        cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict | None = None, **kwargs: Any
    ) -> LLM2VecModule:
        path = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        return cls(LLM2Vec.from_pretrained(path, **(model_kwargs or {})))


def to_sentence_transformer(encoder: LLM2Vec, **kwargs: Any) -> Any:
    """A ``SentenceTransformer`` built on `encoder` (`kwargs` go to its constructor, e.g. ``prompts``)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[LLM2VecModule(encoder)], **kwargs)
