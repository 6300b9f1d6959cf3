"""Host-side launch configuration shared by the attention launchers: tile tables and their pruning,
the launch shape of a batch layout, and the argument forms the kernels index."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


TileSpec = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
INTERPRETER_TILES: TileSpec = (32, 32, 4, 1)


def input_class(dtype: torch.dtype, block_d: int) -> str:
    """Inputs that want different tiles: 16-bit up to head dim 128, 16-bit wider, and fp32
    (exact fp32 dots run on CUDA cores and need far more registers per tile)."""
    if dtype == torch.float32:
        return "fp32"
    return "half_wide" if block_d > 128 else "half"


TUNE_VARIABLE = "LLM2VEC_FAST_AUTOTUNE"  # unset: tune over every tile of a class; N: over its first N only


def tune_limit() -> int | None:
    """How many tiles of a class the autotuner times (LLM2VEC_FAST_AUTOTUNE=N; 1 = no tuning, for a GPU
    session that must not spend its minutes compiling candidates); None = all."""
    value = os.environ.get(TUNE_VARIABLE, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TUNE_VARIABLE} must be a positive number of tiles, got {value!r}")
    return int(value)


def autotuned(
    table: dict[str, list[TileSpec]],
    hopper_table: dict[str, list[TileSpec]] | None = None,
    ampere_table: dict[str, list[TileSpec]] | None = None,
) -> dict:
    """``triton.autotune`` arguments (configs and a prune picking the inputs' class) from a table
    class -> tile specs; for a kernel with a Hopper path (constexpr HOPPER) the table that path tunes over;
    and the tiles that only GPUs before Hopper add to `table` (on Hopper they would compile to mma.sync).
    kernels/catalog.py lists the same tables; tests/test_triton_compile.py checks what each compiles to on
    sm_80 and sm_90a. The interpreter gets one small fixed tile."""
    tables = [t for t in (table, hopper_table, ampere_table) if t is not None]
    every = (s for t in tables for row in t.values() for s in row)
    specs = [INTERPRETER_TILES] if INTERPRETING else list(dict.fromkeys(every))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in specs]

    def prune(configs, named_args, **kwargs):
        if INTERPRETING:
            return configs
        q = named_args["Q"]
        name = input_class(q.dtype, kwargs["BLOCK_D"])
        if hopper_table is not None and kwargs.get("HOPPER"):
            allowed = hopper_table[name]
        else:
            before_hopper = ampere_table is not None and torch.cuda.get_device_capability(q.device)[0] < 9
            allowed = table.get(name, []) + (ampere_table.get(name, []) if before_hopper else [])
        spec = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        return [c for wanted in allowed for c in configs if spec(c) == wanted][: tune_limit()]  # in table order

    return dict(configs=configs, prune_configs_by={"early_config_prune": prune})


PATH_VARIABLE = "LLM2VEC_FAST_TRITON_PATH"  # auto | hopper | ampere
PACK_GQA_VARIABLE = "LLM2VEC_FAST_PACK_GQA"  # auto | 1 | 0


def _choice(variable: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "auto")
    if value not in allowed:
        raise ValueError(f"{variable} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def hopper_path(device: torch.device) -> bool:
    """Whether kernels with a Hopper path (TMA descriptors, warp-specialized loops) take it on `device`:
    compute capability >= 9 on a GPU. LLM2VEC_FAST_TRITON_PATH=hopper|ampere forces either, so that the
    interpreter tests run both paths and a benchmark can compare them on one GPU."""
    choice = _choice(PATH_VARIABLE, ("auto", "hopper", "ampere"))
    if choice != "auto":
        return choice == "hopper"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these (batch, token, head, dim) or (token, head, dim) tensors:
    16-byte aligned base and strides, a unit last stride, token rows at least a head-dim row apart.
    Otherwise the kernels read them by pointers (the same kernel, HOPPER off)."""
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.data_ptr() % 16 or tensor.stride(-1) != 1 or tensor.stride(-3) < tensor.shape[-1]:
            return False
        if any(stride * size % 16 for stride in tensor.stride()[:-1]):
            return False
    return True


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors take global scratch from Triton's allocator at launch (every triton
    3.6-3.9): install a torch one on CUDA unless the caller has set their own."""
    from triton.runtime import _allocation

    if device.type == "cuda" and isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def pack_gqa(group: int, is_varlen: bool) -> bool:
    """Whether the query heads sharing a KV head share a tile's rows: by default for packed batches with
    GQA (short sequences fill tiles); LLM2VEC_FAST_PACK_GQA=1|0 forces it on or off."""
    choice = _choice(PACK_GQA_VARIABLE, ("auto", "1", "0"))
    if choice != "auto":
        return choice == "1" and group > 1
    return group > 1 and is_varlen


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting ("highest" = exact fp32, else tf32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class LaunchShape:
    """What a launch needs to know about the batch layout, derived once per call."""

    batch: int
    seqlen_q: int  # padded length, or max_seqlen_q for varlen
    seqlen_k: int
    is_varlen: bool
    key_mask: torch.Tensor | None  # uint8 (B, Sk), contiguous, 1 = real key
    key_spans: torch.Tensor | None  # int32 (B, R, 2): [start, end) of each span of keys
    num_spans: torch.Tensor | None  # int32 (B,)
    mask_queries: bool  # padded self-attention: the key mask also marks query rows
    window_left: int
    window_right: int

    @property
    def stride_mask(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.stride(0)

    @property
    def stride_spans(self) -> int:
        return 0 if self.key_spans is None else self.key_spans.stride(0)


def unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with the unit last stride the kernels read head-dim rows with, copying only what needs it:
    dims of stride 0 (broadcast) stay so, so the expanded gradient of ``out.sum()`` (every stride 0)
    costs one head-dim row, not a full write (its other strides are read as they are)."""
    if tensor.stride(-1) == 1:
        return tensor
    kept = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride()[:-1])
    return tensor[kept].contiguous().expand(tensor.shape)


def launch_shape(q: torch.Tensor, k: torch.Tensor, layout, options) -> LaunchShape:
    """The launch shape of an ``llm2vec_fast`` AttentionLayout (its key mask as KeySpans) and AttentionOptions."""
    left, right = options.key_window
    if layout.is_packed:
        return LaunchShape(
            layout.cu_seqlens_q.numel() - 1,
            layout.max_seqlen_q,
            layout.max_seqlen_k,
            True,
            None,
            None,
            None,
            False,
            left,
            right,
        )
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    mask_bytes, spans, num_spans = layout.key_mask_state or (None, None, None)
    mask_queries = mask_bytes is not None and seqlen_q == seqlen_k
    return LaunchShape(batch, seqlen_q, seqlen_k, False, mask_bytes, spans, num_spans, mask_queries, left, right)


def mask_args(shape: LaunchShape, layout, placeholder: torch.Tensor) -> tuple:
    """(KeyMask, KeySpans, NumSpans, CuSeqlensQ, CuSeqlensK) kernel arguments, contiguous (the kernels
    index them with unit strides; a view of offsets is copied); absent ones point at a placeholder that
    the kernel never dereferences (its constexpr flags compile those loads away)."""
    return tuple(
        placeholder if t is None else t.contiguous()
        for t in (shape.key_mask, shape.key_spans, shape.num_spans, layout.cu_seqlens_q, layout.cu_seqlens_k)
    )


def seqlen_bucket(seqlen: int) -> int:
    """Autotuning key: sequences within a factor of two share tuned block sizes."""
    return 1 << max(4, math.ceil(math.log2(max(seqlen, 1))))
