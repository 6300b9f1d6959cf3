"""``LLM2Vec``: a drop-in for the official ``llm2vec`` 0.2.3 encoder, on packed tokens and our kernels.

Same inputs (plain texts or ``[instruction, text]`` pairs), same text preparation (instruction
separator, ``doc_max_length`` trimming, chat templates, EOS for ``eos_token`` pooling), same
pooling, same saved format. Differences, all deliberate:

- no padding is ever computed: each batch is packed into one row of real tokens, every sequence
  gets positions from 0, so an embedding does not depend on batch size, batch composition, order
  or padding side (the official encoder's does, in bf16);
- batches are planned by length with an optional token budget (``max_batch_tokens``);
- one process per device for multi-GPU encoding (:class:`EncodePool`), and a streaming API
  (:meth:`LLM2Vec.encode_stream`) for inputs of any size;
- a text without pooled tokens (e.g. an empty text after an instruction) is pooled over all its
  tokens instead of over padding;
- a text that whole-word trimming would empty (no whitespace) keeps its first ``doc_max_length``
  tokens, and a text containing the instruction separator keeps it and its instruction boundary
  (:mod:`llm2vec_fast.text`);
- encoding runs without dropout whatever the module's mode, and never changes that mode, so calls
  from several threads at once give the same vectors as one after another.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .hf import (
    ATTENTION_NAME,
    check_supported_model,
    pack_batch,
    pack_sequences,
    route_attention,
    transformers_model,
    use_fused_cpu_ops,
    without_dropout,
)
from .loading import load_encoder_parts, quiet_libraries, save_encoder
from .pooling import check_pooling_mode, pool_packed
from .runtime import check_device
from .text import (
    INSTRUCTION_SEPARATOR,
    prepare_for_tokenization,
    split_at_instruction,
    split_prepared,
    tokenize_with_instruction,
    trim_to_tokens,
)

MTEB_KWARGS = frozenset(
    {"task_name", "prompt_type", "task_metadata", "hf_split", "hf_subset", "prompt_name", "request_qid"}
)
"""Keyword arguments MTEB passes to ``encode``; accepted and ignored."""


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches, longest first: at most `batch_size` sequences and `max_batch_tokens` tokens each.

    A sequence longer than the token budget gets a batch of its own.
    """
    check_positive_int("batch_size", batch_size)
    if max_batch_tokens is not None and not _is_positive_int(max_batch_tokens):
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in order:
        too_many = len(current) == batch_size
        too_long = max_batch_tokens is not None and tokens + lengths[index] > max_batch_tokens
        if current and (too_many or too_long):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    if current:
        batches.append(current)
    return batches


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(name: str, value: object) -> int:
    """`value`, if it is a positive int; else a ValueError naming `name`."""
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_instruction(instruction: object) -> None:
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string or None, got {type(instruction).__name__}")


def to_pairs(sentences: Sequence[Any], instruction: str | None = None) -> list[tuple[str, str]]:
    """``(instruction, text)`` for each input: plain strings get `instruction` (or none), pairs keep theirs."""
    check_instruction(instruction)
    pairs = []
    for position, item in enumerate(sentences):
        if isinstance(item, str):
            pairs.append((instruction or "", item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(part, str) for part in item):
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(
                f"sentence {position} must be a string or an [instruction, text] pair of strings, got {item!r:.80}"
            )
    return pairs


BatchCallback = Callable[[int, int | None], None]
"""Told after each encoded batch its number of texts and of tokens (None where not known)."""


def _format_output(embeddings: Tensor, convert_to_numpy: bool, convert_to_tensor: bool) -> Tensor | np.ndarray:
    if convert_to_numpy and not convert_to_tensor:
        return embeddings.numpy()
    return embeddings


def _with_progress(
    blocks: Iterator[Tensor], convert_to_numpy: bool, show_progress_bar: bool
) -> Iterator[Tensor | np.ndarray]:
    from tqdm.auto import tqdm

    with tqdm(desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
        for block in blocks:
            progress.update(len(block))
            yield _format_output(block, convert_to_numpy, False)


def _reporting_blocks(blocks: Iterator[Tensor], on_batch: BatchCallback) -> Iterator[Tensor]:
    for block in blocks:
        on_batch(len(block), None)
        yield block


class LLM2Vec(nn.Module):
    """Text encoder over a bidirectional decoder; the official llm2vec 0.2.3 API."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
    ):
        super().__init__()
        config = transformers_model(model).config
        check_supported_model(config)
        if config._attn_implementation != ATTENTION_NAME:
            route_attention(model, causal=getattr(config, "is_causal", True) is not False)
        use_fused_cpu_ops(model)  # RMSNorm, SwiGLU and rotary in one pass each where it runs on CPU in float32
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = check_pooling_mode(pooling_mode)
        self.max_length = check_positive_int("max_length", max_length)
        self.doc_max_length = check_positive_int("doc_max_length", doc_max_length)
        if not isinstance(skip_instruction, bool):
            raise TypeError(f"skip_instruction must be a bool, got {type(skip_instruction).__name__}")
        self.skip_instruction = skip_instruction
        self.config = model.config
        self.training = model.training  # wrapping the model does not change its mode

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path: str,
        peft_model_name_or_path: str | None = None,
        merge_peft: bool = False,
        enable_bidirectional: bool = True,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        *,
        attention_backend: str | None = None,
        verbose: bool = False,
        **hf_kwargs: Any,
    ) -> LLM2Vec:
        """Load a model (and optionally a PEFT adapter) as the official ``LLM2Vec.from_pretrained`` does.

        The base is a checkpoint, an MNTP output (adapter only) or a released ``-mntp`` repository
        (config, tokenizer and adapter, no weights: the base named by its adapter config is loaded and
        the adapter merged; its custom code never runs), see :mod:`llm2vec_fast.loading`.
        Encoder settings left as None come from ``llm2vec_config.json`` (in the adapter directory if
        one is given, else the base), then from the defaults mean / 512 / 400 / True.
        `attention_backend` forces an attention backend; `hf_kwargs` go to ``AutoModel.from_pretrained``
        (e.g. ``dtype=torch.bfloat16``, ``device_map``). With ``enable_bidirectional=False`` the model
        stays causal (still on our kernels). transformers' load report, progress bars and deprecation warnings
        are silenced during the load unless `verbose`.
        """
        explicit = dict(
            pooling_mode=pooling_mode,
            max_length=max_length,
            doc_max_length=doc_max_length,
            skip_instruction=skip_instruction,
        )
        with quiet_libraries(verbose):
            model, tokenizer, settings = load_encoder_parts(
                base_model_name_or_path,
                peft_model_name_or_path,
                merge_peft,
                enable_bidirectional,
                explicit,
                attention_backend,
                hf_kwargs,
            )
        return cls(model=model, tokenizer=tokenizer, **settings)

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Save model (or adapter), tokenizer and ``llm2vec_config.json`` in the official layout;
        ``from_pretrained(output_path)`` reloads the same embeddings."""
        save_encoder(self, output_path, merge_before_save, save_config)

    # ------------------------------------------------------------------ text preparation (official semantics)

    def prepare_for_tokenization(self, text: str) -> str:
        """Apply the chat template of known instruct models, and append EOS for ``eos_token`` pooling."""
        return prepare_for_tokenization(
            text,
            model_name=getattr(self.model.config, "_name_or_path", ""),
            model_type=getattr(self.model.config, "model_type", None),
            eos_token=(self.tokenizer.eos_token or "") if self.pooling_mode == "eos_token" else None,
        )

    def prepare_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``(head, tail)`` of each ``(instruction, text)`` as the official encoder prepares it: the text trimmed
        to ``doc_max_length`` tokens, ``instruction + " "`` before it, then :meth:`prepare_for_tokenization`
        (chat template, EOS); cut where the official separator goes (see :mod:`llm2vec_fast.text`)."""
        texts = trim_to_tokens(self.tokenizer, [text for _, text in pairs], self.doc_max_length, self.max_length)
        heads = [f"{instruction.strip()} " if instruction else "" for instruction, _ in pairs]
        return [split_at_instruction(head, text, self.prepare_for_tokenization) for head, text in zip(heads, texts)]

    def prepare_texts(self, pairs: list[tuple[str, str]]) -> list[str]:
        """The strings the official encoder tokenizes: ``instruction !@#$%^&*()text`` (:meth:`prepare_pairs`)."""
        return [f"{head}{INSTRUCTION_SEPARATOR}{tail}" for head, tail in self.prepare_pairs(pairs)]

    def tokenize_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each ``(instruction, text)`` prepared the official way, and its instruction length."""
        return tokenize_with_instruction(self.tokenizer, self.prepare_pairs(pairs), self.max_length)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Official-format features of prepared strings (:meth:`prepare_texts`; the instruction ends at the first
        separator): padded ``input_ids``, ``attention_mask`` and ``embed_mask`` (1 on the text tokens), padded on
        ``tokenizer.padding_side``."""
        prepared = [split_prepared(text) for text in texts]
        ids, instruction_lengths = tokenize_with_instruction(self.tokenizer, prepared, self.max_length)
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        lengths = batch["attention_mask"].sum(-1)
        embed_mask = torch.zeros_like(batch["attention_mask"])
        for row, (length, instruction_length) in enumerate(zip(lengths.tolist(), instruction_lengths)):
            real = batch["attention_mask"][row].nonzero().flatten()
            embed_mask[row, real[instruction_length:length]] = 1
        batch["embed_mask"] = embed_mask
        return dict(batch)

    def token_lengths(self, sentences: Sequence[str | Sequence[str]], instruction: str | None = None) -> list[int]:
        """How many tokens each input is encoded with (after preparation and truncation)."""
        ids, _ = self.tokenize_pairs(to_pairs(list(sentences), instruction))
        return [len(x) for x in ids]

    # ------------------------------------------------------------------ forward

    def embed_packed(self, packed: Any, instruction_lengths: Tensor | None) -> Tensor:
        """Float32 ``(B, H)`` embeddings of a :class:`~llm2vec_fast.hf.PackedBatch`, pooled after each sequence's
        first `instruction_lengths` tokens when ``skip_instruction`` (the model runs in its current mode)."""
        if packed.num_tokens == 0:
            return torch.zeros(packed.batch_size, self.model.config.hidden_size, device=packed.input_ids.device)
        output = self.model(**packed.model_inputs())
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(
                f"LLM2Vec needs a base model returning last_hidden_state (AutoModel), got {type(self.model).__name__}"
            )
        if not self.skip_instruction:
            instruction_lengths = None
        return pool_packed(hidden[0], packed.cu_seqlens, self.pooling_mode, instruction_lengths)

    def forward(self, sentence_feature: dict[str, Tensor]) -> Tensor:
        """Embeddings of official-format features (``input_ids``, ``attention_mask``, ``embed_mask``)."""
        input_ids = sentence_feature["input_ids"]
        attention_mask = sentence_feature.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        packed = pack_batch(input_ids, attention_mask)
        instruction_lengths = None
        embed_mask = sentence_feature.get("embed_mask")
        if embed_mask is not None:
            instruction_lengths = attention_mask.sum(-1) - (embed_mask.bool() & attention_mask.bool()).sum(-1)
        return self.embed_packed(packed, instruction_lengths)

    # ------------------------------------------------------------------ encoding

    def _device(self, device: str | torch.device | None) -> torch.device:
        inner = transformers_model(self.model)
        if getattr(inner, "hf_device_map", None) and len(set(inner.hf_device_map.values())) > 1:
            return inner.get_input_embeddings().weight.device  # dispatched over devices: leave it where it is
        target = check_device(device)
        self.to(target)
        return target

    def encode(
        self,
        sentences: str | Sequence[str | Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device: str | torch.device | Sequence[str] | None = None,
        *,
        instruction: str | None = None,
        max_batch_tokens: int | None = None,
        **kwargs: Any,
    ) -> Tensor | np.ndarray:
        """Embed texts or ``[instruction, text]`` pairs; float32 ``(N, H)`` on the CPU, in input order.

        `instruction` applies to plain-string inputs. Batches hold at most `batch_size` sequences and
        (if given) `max_batch_tokens` tokens. A list of devices encodes with one process per device
        (:class:`EncodePool`). A single string returns one ``(H,)`` vector. The keyword arguments MTEB
        (1.x) passes (``task_name``, ``prompt_type``, ...) are accepted and ignored; others raise TypeError.
        """
        unknown = set(kwargs) - MTEB_KWARGS
        if unknown:
            raise TypeError(f"encode() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        if len(sentences) == 3 and all(isinstance(s, str) for s in sentences[:2]) and isinstance(sentences[2], int):
            sentences = [sentences[:2]]  # MTEB's MEDI format: one [instruction, text, id] input (as the official)
        pairs = to_pairs(sentences, instruction)
        if isinstance(device, (list, tuple)):
            blocks = self.encode_stream(
                pairs,
                chunk_size=1024,
                devices=device,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                show_progress_bar=show_progress_bar,
            )
            embeddings = torch.cat([torch.zeros(0, self.model.config.hidden_size), *blocks])
        else:
            embeddings = self._encode_pairs(pairs, batch_size, max_batch_tokens, show_progress_bar, device)
        if single:
            embeddings = embeddings[0]
        return _format_output(embeddings, convert_to_numpy, convert_to_tensor)

    @torch.inference_mode()
    def _encode_pairs(
        self,
        pairs: list[tuple[str, str]],
        batch_size: int,
        max_batch_tokens: int | None,
        show_progress_bar: bool,
        device: str | torch.device | None,
        on_batch: BatchCallback | None = None,
    ) -> Tensor:
        from tqdm.auto import tqdm

        hidden_size = self.model.config.hidden_size
        if not pairs:
            plan_batches([], batch_size, max_batch_tokens)  # still validates the arguments
            return torch.zeros(0, hidden_size)
        ids, instruction_lengths = self.tokenize_pairs(pairs)
        batches = plan_batches([len(x) for x in ids], batch_size, max_batch_tokens)
        target = self._device(device)
        result = torch.empty(len(pairs), hidden_size)
        with (
            without_dropout(self.model),
            tqdm(total=len(pairs), desc="Encoding", unit="text", disable=not show_progress_bar) as progress,
        ):
            for batch in batches:
                packed = pack_sequences([ids[i] for i in batch], device=target)
                lengths = torch.tensor([instruction_lengths[i] for i in batch], device=target)
                result[torch.tensor(batch)] = self.embed_packed(packed, lengths).cpu()
                progress.update(len(batch))
                if on_batch is not None:
                    on_batch(len(batch), sum(len(ids[i]) for i in batch))
        return result

    def encode_stream(
        self,
        sentences: Iterable[str | Sequence[str]],
        chunk_size: int = 4096,
        *,
        devices: Sequence[str] | None = None,
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
        instruction: str | None = None,
        convert_to_numpy: bool = False,
        device: str | torch.device | None = None,
        show_progress_bar: bool = False,
        on_batch: BatchCallback | None = None,
    ) -> Iterator[Tensor | np.ndarray]:
        """Embed an iterable of any size chunk by chunk, yielding ``(n, H)`` float32 blocks in input order.

        With `devices`, chunks are spread over one process per device (:class:`EncodePool`). At most
        `chunk_size` inputs (times twice the number of devices) are held in memory at once. The settings
        are checked here, before the first input is read. `on_batch` (a progress display) is told the texts
        and tokens of each forward as it ends; with `devices`, of each chunk as it arrives (tokens None).
        """
        check_positive_int("chunk_size", chunk_size)
        plan_batches([], batch_size, max_batch_tokens)
        check_instruction(instruction)
        for name in devices or [device]:
            check_device(name)
        iterator = iter(sentences)
        raw_chunks = iter(lambda: list(itertools.islice(iterator, chunk_size)), [])
        chunks = (to_pairs(chunk, instruction) for chunk in raw_chunks)
        if devices:  # the pool sits above the encoder: imported here
            from .encode_pool import encode_on_devices

            blocks = encode_on_devices(self, chunks, devices, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
            if on_batch is not None:
                blocks = _reporting_blocks(blocks, on_batch)
        else:
            blocks = (
                self._encode_pairs(chunk, batch_size, max_batch_tokens, False, device, on_batch) for chunk in chunks
            )
        return _with_progress(blocks, convert_to_numpy, show_progress_bar)

    # ------------------------------------------------------------------ official helpers

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None
    ) -> nn.Embedding:
        return self.model.resize_token_embeddings(new_num_tokens=new_num_tokens, pad_to_multiple_of=pad_to_multiple_of)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
