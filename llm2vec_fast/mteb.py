"""MTEB 2.x: an :class:`~llm2vec_fast.LLM2Vec` encoder behind mteb's encoder protocol.

    import mteb
    from llm2vec_fast.mteb import get_model

    model = get_model("McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                      "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised", dtype="bfloat16")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STS12"]), encode_kwargs={"batch_size": 64})

Instructions are picked as mteb's own LLM2Vec wrapper picks them (the task's prompt for the prompt
type, else its task type's default, ending in ":"), and given as LLM2Vec instructions: queries and
symmetric inputs are encoded as ``[instruction, text]``, documents as plain texts (LLM2Vec's evaluation).
``mteb.evaluate(l2v, task)`` on a bare ``LLM2Vec`` has no model implementation; wrap it in :class:`LLM2VecMTEB`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_implementations.llm2vec_models import llm2vec_instruction
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from .encoder import LLM2Vec

NAME_PREFIX = "llm2vec-fast"
"""Owner given to a model name without one (mteb names models ``organization/model_name``)."""


class LLM2VecMTEB(AbsEncoder):
    """mteb's ``EncoderProtocol`` over an :class:`~llm2vec_fast.LLM2Vec` (cosine similarity, float32 embeddings).

    `instructions` (task name, task type or prompt type -> instruction) take precedence over the tasks' own
    prompts, as a ``prompts_dict`` does for mteb's wrappers; documents stay plain texts.
    """

    def __init__(
        self,
        encoder: LLM2Vec,
        *,
        name: str | None = None,
        revision: str | None = None,
        instructions: Mapping[str, str] | None = None,
        loader_kwargs: Mapping[str, Any] | None = None,
    ):
        if not isinstance(encoder, LLM2Vec):
            raise TypeError(f"LLM2VecMTEB wraps an llm2vec_fast.LLM2Vec, got {type(encoder).__name__}")
        self.model = encoder
        self.prompts_dict = dict(instructions) if instructions else None
        name = name or getattr(encoder.model, "name_or_path", "") or "model"
        self.mteb_model_meta = model_meta(encoder, name, revision, loader_kwargs)

    def instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
        """The LLM2Vec instruction for this task's inputs of `prompt_type` ("" for documents)."""
        if prompt_type == PromptType.document:
            return ""
        return llm2vec_instruction(self.get_instruction(task_metadata, prompt_type))

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Float32 ``(N, H)`` embeddings of the texts of `inputs` (mteb's ``DataLoader[BatchedInput]``).

        `kwargs` (mteb's ``encode_kwargs``: ``batch_size``, ``show_progress_bar``, or e.g. ``max_batch_tokens``)
        go to :meth:`LLM2Vec.encode`; ``precision`` can only be ``"float32"``.
        """
        precision = kwargs.pop("precision", "float32")
        if precision != "float32":
            raise ValueError(f"precision must be 'float32' (LLM2Vec embeddings are float32), got {precision!r}")
        texts = [text for batch in inputs for text in batch["text"]]
        instruction = self.instruction(task_metadata, prompt_type)
        return self.model.encode(texts, instruction=instruction, convert_to_numpy=True, **kwargs)


def get_model(
    base_model_name_or_path: str,
    peft_model_name_or_path: str | None = None,
    *,
    name: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    instructions: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> LLM2VecMTEB:
    """Load an encoder as :meth:`LLM2Vec.from_pretrained` does (`kwargs`: ``merge_peft``, ``pooling_mode``,
    ``dtype``, ...; `device` becomes ``device_map``) and wrap it for ``mteb.evaluate``.

    The model is named `name`, else after the adapter (mteb's convention for LLM2Vec models), else the base.
    """
    if device is not None:
        kwargs["device_map"] = device
    encoder = LLM2Vec.from_pretrained(base_model_name_or_path, peft_model_name_or_path, **kwargs)
    loader_kwargs = {
        "base_model_name_or_path": base_model_name_or_path,
        "peft_model_name_or_path": peft_model_name_or_path,
        "instructions": dict(instructions) if instructions else None,
        **{key: _json_value(value) for key, value in kwargs.items()},
    }
    return LLM2VecMTEB(
        encoder,
        name=name or peft_model_name_or_path or base_model_name_or_path,
        revision=revision,
        instructions=instructions,
        loader_kwargs=loader_kwargs,
    )


def _load(model_name: str, revision: str | None = None, **loader_kwargs: Any) -> LLM2VecMTEB:
    """``ModelMeta.loader``: mteb calls it with the model's name and revision, then the loader kwargs."""
    return get_model(name=model_name, revision=revision, **loader_kwargs)


def _json_value(value: Any) -> Any:
    """A torch dtype as its name (``"bfloat16"``, which transformers accepts), so mteb can save the model meta."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def model_meta(
    encoder: LLM2Vec, name: str, revision: str | None = None, loader_kwargs: Mapping[str, Any] | None = None
) -> ModelMeta:
    """mteb's description of `encoder`; with `loader_kwargs` (:func:`get_model`'s arguments) it can reload it."""
    return ModelMeta(
        loader=_load if loader_kwargs is not None else None,
        loader_kwargs=dict(loader_kwargs or {}),
        name=name if "/" in name else f"{NAME_PREFIX}/{name}",
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=sum(parameter.numel() for parameter in encoder.parameters()),
        memory_usage_mb=None,
        max_tokens=encoder.max_length,
        embed_dim=encoder.model.config.hidden_size,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["LLM2Vec", "PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,
        training_datasets=None,
    )
