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
  tokens instead of over padding.
"""
from __future__ import annotations

import itertools
import queue
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .hf import (
    ATTENTION_NAME,
    check_supported_model,
    pack_batch,
    pack_sequences,
    register,
    route_attention,
    transformers_model,
)
from .loading import CONFIG_NAME, ENCODER_DEFAULTS, load_encoder_parts, save_encoder  # noqa: F401 (re-exported)
from .pooling import check_pooling_mode, pool_packed

INSTRUCTION_SEPARATOR = "!@#$%^&*()"
"""Official llm2vec marker between instruction and text in a prepared string."""
MTEB_KWARGS = frozenset(
    {"task_name", "prompt_type", "task_metadata", "hf_split", "hf_subset", "prompt_name", "request_qid"}
)
"""Keyword arguments MTEB passes to ``encode``; accepted and ignored."""

# Chat templates the official encoder applies for these exact model names.
_TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
    "mistralai/Mistral-7B-Instruct-v0.2": "[INST] {} [/INST]",
    "meta-llama/Llama-2-7b-chat-hf": "[INST] {} [/INST]",
    "google/gemma-2-9b-it": "<bos><start_of_turn>user\n{}<end_of_turn>",
    "Qwen/Qwen2-1.5B-Instruct": "<|im_start|>user\n{}<|im_end|>",
    "Qwen/Qwen2-7B-Instruct": "<|im_start|>user\n{}<|im_end|>",
}
_EOS_SUFFIX = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches, longest first: at most `batch_size` sequences and `max_batch_tokens` tokens each.

    A sequence longer than the token budget gets a batch of its own.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
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


def to_pairs(sentences: Sequence[Any], instruction: str | None = None) -> list[tuple[str, str]]:
    """``(instruction, text)`` for each input: plain strings get `instruction` (or none), pairs keep theirs."""
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


def _format_output(embeddings: Tensor, convert_to_numpy: bool, convert_to_tensor: bool) -> Tensor | np.ndarray:
    if convert_to_numpy and not convert_to_tensor:
        return embeddings.numpy()
    return embeddings



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
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = check_pooling_mode(pooling_mode)
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.config = model.config

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
        stays causal (still on our kernels).
        """
        explicit = dict(
            pooling_mode=pooling_mode,
            max_length=max_length,
            doc_max_length=doc_max_length,
            skip_instruction=skip_instruction,
        )
        model, tokenizer, settings = load_encoder_parts(
            base_model_name_or_path, peft_model_name_or_path, merge_peft, enable_bidirectional, explicit,
            attention_backend, hf_kwargs,
        )
        return cls(model=model, tokenizer=tokenizer, **settings)

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Save model (or adapter), tokenizer and ``llm2vec_config.json`` in the official layout;
        ``from_pretrained(output_path)`` reloads the same embeddings."""
        save_encoder(self, output_path, merge_before_save, save_config)

    # ------------------------------------------------------------------ text preparation (official semantics)

    def prepare_for_tokenization(self, text: str) -> str:
        """Apply the chat template of known instruct models, and append EOS for ``eos_token`` pooling."""
        name = getattr(self.model.config, "_name_or_path", "")
        if name in _TEMPLATES:
            text = _TEMPLATES[name].format(text.strip())
            if name == "meta-llama/Meta-Llama-3-8B-Instruct":
                return text
        if self.pooling_mode == "eos_token":
            if name == "meta-llama/Meta-Llama-3-8B":
                return text.strip() + "<|end_of_text|>"
            model_type = getattr(self.model.config, "model_type", None)
            suffix = _EOS_SUFFIX.get(model_type, self.tokenizer.eos_token or "")
            text = text.strip() + suffix
        return text

    def prepare_texts(self, pairs: list[tuple[str, str]]) -> list[str]:
        """The strings the official encoder tokenizes: ``instruction !@#$%^&*()text``, the text trimmed by words
        to ``doc_max_length`` tokens, then :meth:`prepare_for_tokenization` (chat template, EOS)."""
        texts = [text for _, text in pairs]
        lengths = self._token_counts(texts)
        joined = []
        for (instruction, text), length in zip(pairs, lengths):
            while length > self.doc_max_length:
                words = text.split()
                text = " ".join(words[: int(len(words) * self.doc_max_length / length)])
                length = self._token_counts([text])[0]
            prefix = f"{instruction.strip()} " if instruction else ""
            joined.append(self.prepare_for_tokenization(f"{prefix}{INSTRUCTION_SEPARATOR}{text}"))
        return joined

    def _token_counts(self, texts: list[str]) -> list[int]:
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def _tokenize_prepared(self, prepared: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prepared string and how many leading tokens precede the text (the instruction)."""
        originals, texts = [], []
        for string in prepared:
            parts = string.split(INSTRUCTION_SEPARATOR)
            texts.append(parts[1] if len(parts) > 1 else "")
            originals.append("".join(parts))
        ids = self.tokenizer(originals, truncation=True, max_length=self.max_length)["input_ids"]
        counts = self._token_counts(texts)
        return ids, [max(len(i) - c, 0) for i, c in zip(ids, counts)]

    def tokenize_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each ``(instruction, text)`` prepared the official way, and how many are instruction."""
        return self._tokenize_prepared(self.prepare_texts(pairs))

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Official-format features of prepared strings (:meth:`prepare_texts`): padded ``input_ids``,
        ``attention_mask`` and ``embed_mask`` (1 on the text tokens), padded on ``tokenizer.padding_side``."""
        ids, skips = self._tokenize_prepared(list(texts))
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        lengths = batch["attention_mask"].sum(-1)
        embed_mask = torch.zeros_like(batch["attention_mask"])
        for row, (length, skip) in enumerate(zip(lengths.tolist(), skips)):
            real = batch["attention_mask"][row].nonzero().flatten()
            embed_mask[row, real[skip:length]] = 1
        batch["embed_mask"] = embed_mask
        return dict(batch)

    def token_lengths(self, sentences: Sequence[str | Sequence[str]], instruction: str | None = None) -> list[int]:
        """How many tokens each input is encoded with (after preparation and truncation)."""
        ids, _ = self.tokenize_pairs(to_pairs(list(sentences), instruction))
        return [len(x) for x in ids]

    # ------------------------------------------------------------------ forward

    def embed_packed(self, packed: Any, skip: Tensor | None) -> Tensor:
        """Float32 ``(B, H)`` embeddings of a :class:`~llm2vec_fast.hf.PackedBatch`; `skip`: instruction lengths."""
        if packed.num_tokens == 0:
            return torch.zeros(packed.batch_size, self.model.config.hidden_size, device=packed.input_ids.device)
        output = self.model(**packed.model_inputs())
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(
                f"LLM2Vec needs a base model returning last_hidden_state (AutoModel), got {type(self.model).__name__}"
            )
        if not self.skip_instruction:
            skip = None
        return pool_packed(hidden[0], packed.cu_seqlens, self.pooling_mode, skip)

    def forward(self, sentence_feature: dict[str, Tensor]) -> Tensor:
        """Embeddings of official-format features (``input_ids``, ``attention_mask``, ``embed_mask``)."""
        input_ids = sentence_feature["input_ids"]
        attention_mask = sentence_feature.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        packed = pack_batch(input_ids, attention_mask)
        skip = None
        embed_mask = sentence_feature.get("embed_mask")
        if embed_mask is not None:
            skip = attention_mask.sum(-1) - (embed_mask.bool() & attention_mask.bool()).sum(-1)
        return self.embed_packed(packed, skip)

    # ------------------------------------------------------------------ encoding

    def _device(self, device: str | torch.device | None) -> torch.device:
        inner = transformers_model(self.model)
        if getattr(inner, "hf_device_map", None) and len(set(inner.hf_device_map.values())) > 1:
            return inner.get_input_embeddings().weight.device  # dispatched over devices: leave it where it is
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
                pairs, chunk_size=1024, devices=device, batch_size=batch_size,
                max_batch_tokens=max_batch_tokens, show_progress_bar=show_progress_bar,
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
    ) -> Tensor:
        from tqdm.auto import tqdm

        hidden_size = self.model.config.hidden_size
        if not pairs:
            plan_batches([], batch_size, max_batch_tokens)  # still validates the arguments
            return torch.zeros(0, hidden_size)
        ids, skips = self.tokenize_pairs(pairs)
        batches = plan_batches([len(x) for x in ids], batch_size, max_batch_tokens)
        target = self._device(device)
        was_training = self.training
        self.eval()
        result = torch.empty(len(pairs), hidden_size)
        try:
            with tqdm(total=len(pairs), desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
                for batch in batches:
                    packed = pack_sequences([ids[i] for i in batch], device=target)
                    skip = torch.tensor([skips[i] for i in batch], device=target)
                    result[torch.tensor(batch)] = self.embed_packed(packed, skip).cpu()
                    progress.update(len(batch))
        finally:
            self.train(was_training)
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
    ) -> Iterator[Tensor | np.ndarray]:
        """Embed an iterable of any size chunk by chunk, yielding ``(n, H)`` float32 blocks in input order.

        With `devices`, chunks are spread over one process per device (:class:`EncodePool`). At most
        `chunk_size` inputs (times twice the number of devices) are held in memory at once.
        """
        from tqdm.auto import tqdm

        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        iterator = iter(sentences)
        raw_chunks = iter(lambda: list(itertools.islice(iterator, chunk_size)), [])
        chunks = (to_pairs(chunk, instruction) for chunk in raw_chunks)
        with tqdm(desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
            if devices:
                with EncodePool(self, devices, batch_size=batch_size, max_batch_tokens=max_batch_tokens) as pool:
                    for block in pool.map(chunks):
                        progress.update(len(block))
                        yield _format_output(block, convert_to_numpy, False)
                return
            for chunk in chunks:
                block = self._encode_pairs(chunk, batch_size, max_batch_tokens, False, device)
                progress.update(len(block))
                yield _format_output(block, convert_to_numpy, False)

    # ------------------------------------------------------------------ official helpers

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None
    ) -> nn.Embedding:
        return self.model.resize_token_embeddings(new_num_tokens=new_num_tokens, pad_to_multiple_of=pad_to_multiple_of)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


# ---------------------------------------------------------------------- one process per device


def _pool_worker(encoder: LLM2Vec, device: str, settings: dict, tasks: Any, results: Any) -> None:
    try:
        register()  # a spawned process starts with transformers' registries empty
        encoder.to(device)
    except Exception as error:  # reported to the parent, which raises it
        results.put((-1, f"worker on {device} failed to start: {error!r}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        index, pairs = task
        try:
            block = encoder._encode_pairs(pairs, settings["batch_size"], settings["max_batch_tokens"], False, device)
            results.put((index, block.numpy()))
        except Exception as error:
            results.put((index, f"worker on {device} failed: {error!r}"))


class EncodePool:
    """One encoding process per device (spawned; the model's weights are shared, not copied, on the CPU side).

    ``with EncodePool(encoder, ["cuda:0", "cuda:1"]) as pool: blocks = pool.map(chunks)`` streams
    chunks of ``(instruction, text)`` pairs, two per device in flight, results in input order.
    """

    def __init__(
        self, encoder: LLM2Vec, devices: Sequence[str], *, batch_size: int = 32, max_batch_tokens: int | None = None
    ):
        if not devices:
            raise ValueError("EncodePool needs at least one device")
        for device in devices:
            torch.device(device)  # raises on a malformed device string
        plan_batches([], batch_size, max_batch_tokens)
        context = torch.multiprocessing.get_context("spawn")
        self._tasks = context.Queue()
        self._results = context.Queue()
        settings = {"batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
        self._workers = [
            context.Process(
                target=_pool_worker, args=(encoder, str(device), settings, self._tasks, self._results), daemon=True
            )
            for device in devices
        ]
        for worker in self._workers:
            worker.start()

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()

    def _next_result(self) -> tuple[int, np.ndarray]:
        while True:
            try:
                index, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in self._workers if not w.is_alive()]
                if dead:
                    code = dead[0].exitcode
                    raise RuntimeError(f"an encoding worker exited unexpectedly (exit code {code})") from None
                continue
            if isinstance(value, str):
                raise RuntimeError(value)
            return index, value

    def map(self, chunks: Iterable[list[tuple[str, str]]]) -> Iterator[Tensor]:
        """Embed each chunk of ``(instruction, text)`` pairs; yields ``(n, H)`` float32 tensors in chunk order."""
        pending: dict[int, np.ndarray] = {}
        sent = received = 0
        chunk_iter = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and sent - received < 2 * len(self._workers):
                chunk = next(chunk_iter, None)
                if chunk is None:
                    exhausted = True
                    break
                self._tasks.put((sent, chunk))
                sent += 1
            if received == sent:
                return
            while received not in pending:
                index, value = self._next_result()
                pending[index] = value
            yield torch.from_numpy(pending.pop(received))
            received += 1
