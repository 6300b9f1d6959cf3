"""``EncodePool``: one encoding process per device, for multi-GPU encoding (``LLM2Vec.encode(device=[...])``
and ``LLM2Vec.encode_stream(devices=...)``)."""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .encoder import LLM2Vec, plan_batches
from .hf import register
from .runtime import check_device


def _pool_worker(encoder: LLM2Vec, device: str, settings: dict, tasks: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
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
            check_device(device)
        plan_batches([], batch_size, max_batch_tokens)  # validates both
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

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # an error, Ctrl-C or an abandoned stream: the work in flight is not wanted
            self.terminate()

    def close(self) -> None:
        """Let the workers finish their tasks and exit (ended by force after 30 s)."""
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()

    def terminate(self) -> None:
        """End the workers now."""
        for worker in self._workers:
            worker.terminate()
        for worker in self._workers:
            worker.join(timeout=5)

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


def encode_on_devices(
    encoder: LLM2Vec,
    chunks: Iterable[list[tuple[str, str]]],
    devices: Sequence[str],
    *,
    batch_size: int = 32,
    max_batch_tokens: int | None = None,
) -> Iterator[Tensor]:
    """Embeddings of each chunk of ``(instruction, text)`` pairs, in order, from a pool over `devices`
    (started on the first ``next``, ended when the chunks run out or the iterator is dropped)."""
    with EncodePool(encoder, devices, batch_size=batch_size, max_batch_tokens=max_batch_tokens) as pool:
        yield from pool.map(chunks)
