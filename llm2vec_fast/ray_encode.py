"""Ray Data recipe: an actor class holding one encoder per worker, for ``Dataset.map_batches``.

    import ray, torch
    from llm2vec_fast.ray_encode import RayEncoder

    ds = ray.data.read_text("corpus/")                      # one row per line, column "text"
    embedded = ds.map_batches(
        RayEncoder,
        fn_constructor_kwargs={"model": "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp", "dtype": torch.bfloat16},
        concurrency=8, num_gpus=1, batch_size=1024,           # 8 actors, one GPU and one encoder each
    )
    embedded.write_parquet("embeddings/")                    # adds column "embedding": float32 (rows, hidden)

Ray gives each actor the GPU it reserved as ``cuda`` (it sets ``CUDA_VISIBLE_DEVICES``); without GPUs the
actors encode on the CPU. Ray schedules, retries failed batches and streams to storage; resuming a killed
job is Ray's (or ``llm2vec-fast encode``'s chunked runs). Importing this module does not need Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RayEncoder:
    """Loads one :class:`~llm2vec_fast.LLM2Vec` per actor; each call embeds a batch's `text_column`.

    `instruction_column` (optional) holds per-row instructions; rows without one get `instruction`.
    Other columns pass through; the embeddings go to `output_column`. Keyword arguments not named here go to
    ``LLM2Vec.from_pretrained`` (``peft_model_name_or_path``, ``pooling_mode``, ``dtype``, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        text_column: str = "text",
        instruction_column: str | None = None,
        instruction: str | None = None,
        output_column: str = "embedding",
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        device: str | None = None,
        **from_pretrained: Any,
    ):
        from .encoder import LLM2Vec
        from .runtime import check_device

        self.device = check_device(device)  # None: the GPU Ray assigned, else the CPU
        self.encoder = LLM2Vec.from_pretrained(model, **from_pretrained).to(self.device)
        self.text_column, self.instruction_column, self.output_column = text_column, instruction_column, output_column
        self.instruction, self.batch_size, self.max_batch_tokens = instruction, batch_size, max_batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(text) for text in batch[self.text_column]]
        if self.instruction_column is None:
            inputs: list[Any] = texts
        else:
            instructions = batch[self.instruction_column]
            inputs = [[str(i), t] if i else t for i, t in zip(instructions, texts)]
        embeddings = self.encoder.encode(
            inputs,
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
            instruction=self.instruction,
            show_progress_bar=False,
            convert_to_numpy=True,
            device=self.device,
        )
        return {**batch, self.output_column: embeddings}
