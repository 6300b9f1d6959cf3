"""The Triton forward's paths from one source, against the float64 oracle under the interpreter.

TMA (descriptors for K/V, and Q/O unless GQA packing gathers their rows), HOPPER (TMA with the key loop
warp-specialized, where Triton allows: no mask, no window, no packing; masked and GQA-packed batches walk
their spans with descriptor loads instead) and the pointer (cp.async) path; GQA packing (rows = (token,
head-in-group) pairs) and the packed batches' device-side tile schedule. ``LLM2VEC_FAST_TRITON_PATH`` and
``LLM2VEC_FAST_PACK_GQA`` force the choices the launcher makes on a GPU. Forward only (out and lse), straight
through ``attention_forward``: the backward has its own tests. Every launch is recorded, so each test also
asserts which variant ran.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from attention_cases import key_padding_mask, offsets
from oracle import assert_close, attention_oracle, varlen_oracle

from llm2vec_fast.attention_options import AttentionLayout, AttentionOptions
from llm2vec_fast.kernels import attention_fwd, launch
from llm2vec_fast.key_masks import kernel_spans

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


class Recorder:
    """Stands in for the autotuned kernel: records each launch's grid and constexpr flags, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        def run(*args, **flags):
            self.launches.append(dict(flags, grid=grid))
            return self.kernel[grid](*args, **flags)

        return run

    @property
    def flags(self) -> dict:
        return self.launches[-1]


@pytest.fixture
def launches(monkeypatch) -> Recorder:
    recorder = Recorder(attention_fwd.attention_fwd_kernel)
    monkeypatch.setattr(attention_fwd, "attention_fwd_kernel", recorder)
    return recorder


@pytest.fixture(params=["hopper", "ampere"])
def path(request, monkeypatch) -> str:
    monkeypatch.setenv(launch.PATH_VARIABLE, request.param)
    return request.param


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter runs CPU tensors


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the kernels run, its strides and storage offset kept (the alignment tests need them)."""
    if tensor.device == DEVICE:
        return tensor
    moved = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=DEVICE)
    if tensor.storage_offset() == 0:
        return moved.copy_(tensor)
    storage = torch.empty(tensor.storage_offset() + tensor.numel(), dtype=tensor.dtype, device=DEVICE)
    return storage[tensor.storage_offset() :].view(tensor.shape).copy_(tensor)


def forward(q, k, v, mask=None, cu_seqlens=None, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """(out, lse) of the kernel and of the float64 oracle."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    options = AttentionOptions(causal, window, softcap, scale)
    oracle_options = dict(causal=causal, window_size=window, softcap=softcap, softmax_scale=scale)
    if cu_seqlens is None:
        expected = attention_oracle(q, k, v, key_mask=mask, **oracle_options)
    else:
        expected = varlen_oracle(q, k, v, cu_seqlens, cu_seqlens, **oracle_options)
    q, k, v, mask, cu_seqlens = (None if t is None else on_device(t) for t in (q, k, v, mask, cu_seqlens))
    if cu_seqlens is None:
        layout = AttentionLayout(mask, None, None, q.shape[1], k.shape[1], None if mask is None else kernel_spans(mask))
    else:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        layout = AttentionLayout(None, cu_seqlens, cu_seqlens, longest, longest)
    out, lse = attention_fwd.attention_forward(q, k, v, layout, options)
    return (out.cpu(), lse.cpu()), expected


def check(got, expected, dtype):
    (out, lse), (ref_out, ref_lse) = got, expected
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly on the rows that see no key"
    assert (lse[~finite] == float("-inf")).all()
    if finite.any():
        assert_close(lse[finite], ref_lse[finite], torch.float32, "lse")
    assert_close(out, ref_out, dtype, "out")
    rows = ~finite.transpose(-1, -2) if lse.dim() == 3 else ~finite.T
    if rows.any():
        assert out[rows].abs().max().item() == 0.0, "rows that see no key must output zeros"


def tensors(shape_q, shape_k, dtype):
    return torch.randn(shape_q).to(dtype), torch.randn(shape_k).to(dtype), torch.randn(shape_k).to(dtype)


def descriptors(path, dtype, window=(-1, -1)) -> bool:
    """Whether the launcher reads through TMA descriptors (see attention_fwd.descriptor_loads)."""
    return path == "hopper" and dtype != torch.float32 and window == (-1, -1)


def specialized(path, dtype, mask=None, window=(-1, -1), packed=False) -> bool:
    """Whether the launcher takes the warp-specialized Hopper path (see attention_fwd.warp_specialized)."""
    return descriptors(path, dtype, window) and mask is None and not packed


def assert_path(flags, path, dtype, mask=None, window=(-1, -1), packed=False):
    assert flags["TMA"] == descriptors(path, dtype, window)
    assert flags["HOPPER"] == specialized(path, dtype, mask, window, packed)


@pytest.mark.parametrize("seqlen", [1, 70])
@pytest.mark.parametrize("mask_kind", ["none", "left", "empty_row", "holes"])
def test_padded_lengths_and_masks(path, launches, seqlen, mask_kind):
    """Masked batches on TMA: spans start past left padding (descriptor loads at any key), an all-padding row
    walks none, and full tiles with holes (row 0: keys 1..23; row 1: every third) mask their scores while
    hole-free ones (row 0, keys 32..63) skip the mask."""
    q, k, v = tensors((2, seqlen, 4, 16), (2, seqlen, 2, 16), torch.float16)
    mask = key_padding_mask(mask_kind, 2, seqlen)
    check(*forward(q, k, v, mask), torch.float16)
    assert_path(launches.flags, path, torch.float16, mask)


@pytest.mark.parametrize("heads_q,heads_kv,pack", [(2, 2, "0"), (4, 1, "0"), (4, 2, "1"), (4, 1, "1")])
def test_masked_gqa_batches_on_tma(launches, monkeypatch, heads_q, heads_kv, pack):
    """GQA 1/2/4 on a masked padded batch through the descriptors, with and without GQA packing (then Q/O
    by pointers: the packed rows are (token, head) pairs)."""
    monkeypatch.setenv(launch.PATH_VARIABLE, "hopper")
    monkeypatch.setenv(launch.PACK_GQA_VARIABLE, pack)
    q, k, v = tensors((2, 45, heads_q, 16), (2, 45, heads_kv, 16), torch.bfloat16)
    mask = key_padding_mask("holes", 2, 45)
    check(*forward(q, k, v, mask), torch.bfloat16)
    packed = pack == "1" and heads_q > heads_kv
    assert launches.flags["PACK_GQA"] == packed
    assert_path(launches.flags, "hopper", torch.bfloat16, mask, packed=packed)


def test_strided_and_expanded_inputs_on_tma(launches, monkeypatch):
    """q in (B, H, S, D) storage and k/v expanded over the batch (stride 0): TMA descriptors address both."""
    monkeypatch.setenv(launch.PATH_VARIABLE, "hopper")
    q = torch.randn(2, 2, 40, 16).to(torch.float16).transpose(1, 2)
    k, v = (torch.randn(1, 40, 1, 16).to(torch.float16).expand(2, 40, 1, 16) for _ in range(2))
    mask = key_padding_mask("right", 2, 40)
    check(*forward(q, k, v, mask), torch.float16)
    assert_path(launches.flags, "hopper", torch.float16, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(path, launches, dtype):
    q, k, v = tensors((2, 65, 4, 32), (2, 65, 2, 32), dtype)
    mask = None
    check(*forward(q, k, v, mask), dtype)
    assert_path(launches.flags, path, dtype, mask)


@pytest.mark.parametrize("seqlen_k", [128, 127])
def test_even_key_tiles_skip_the_bounds_mask(path, launches, seqlen_k):
    """Keys a multiple of 128 (every BLOCK_N): the warp-specialized loop has no bounds mask."""
    q, k, v = tensors((1, 40, 2, 16), (1, seqlen_k, 2, 16), torch.bfloat16)
    check(*forward(q, k, v), torch.bfloat16)
    assert launches.flags["EVEN_KEYS"] == (seqlen_k == 128)
    assert launches.flags["HOPPER"] == (path == "hopper")


@pytest.mark.parametrize("head_dim,mask_kind", [(8, "none"), (80, "none"), (256, "none"), (64, "holes"), (80, "right")])
def test_head_dims(path, launches, head_dim, mask_kind):
    """Head dims below a power of two: the descriptors' blocks are BLOCK_D wide, their bounds HEAD_DIM."""
    q, k, v = tensors((2, 40, 2, head_dim), (2, 40, 1, head_dim), torch.bfloat16)
    mask = key_padding_mask(mask_kind, 2, 40)
    check(*forward(q, k, v, mask), torch.bfloat16)
    assert_path(launches.flags, path, torch.bfloat16, mask)


@pytest.mark.parametrize(
    "window,softcap,causal,scale,mask_kind",
    [
        ((-1, -1), 0.0, False, -0.3, "none"),
        ((-1, -1), 2.5, False, -0.4, "none"),
        ((5, 9), 0.0, False, -0.3, "holes"),
        ((7, 7), 4.0, True, None, "holes"),
    ],
)
def test_windows_softcap_and_negative_scales(path, launches, window, softcap, causal, scale, mask_kind):
    """The scale folds into the exp2 FFMA with the max on raw scores: a negative scale takes their min
    (windowed cases take the pointer path on both: they check the span walk's folding)."""
    q, k, v = tensors((2, 70, 2, 16), (2, 70, 1, 16), torch.bfloat16)
    mask = key_padding_mask(mask_kind, 2, 70)
    got = forward(q, k, v, mask, causal=causal, window=window, softcap=softcap, scale=scale)
    check(*got, torch.bfloat16)
    window = (-1, 0) if causal and window == (-1, -1) else window
    assert_path(launches.flags, path, torch.bfloat16, mask, window)


@pytest.mark.parametrize("scale,softcap", [(-0.3, 0.0), (None, 3.0)])
def test_masked_negative_scales_and_softcap_on_tma(launches, monkeypatch, scale, softcap):
    """A full tile with a hole masks to +inf under a negative scale (the row min is the max score)."""
    monkeypatch.setenv(launch.PATH_VARIABLE, "hopper")
    q, k, v = tensors((2, 70, 2, 16), (2, 70, 1, 16), torch.bfloat16)
    mask = key_padding_mask("holes", 2, 70)
    check(*forward(q, k, v, mask, softcap=softcap, scale=scale), torch.bfloat16)
    assert_path(launches.flags, "hopper", torch.bfloat16, mask)


def short_lengths(count: int, longest: int) -> list[int]:
    """`count` sequence lengths: the first empty, one `longest`, the others in 1..40 or empty."""
    lengths = torch.randint(1, min(longest, 40) + 1, (count,))
    lengths[torch.randperm(count)[: count // 6]] = 0
    lengths[0] = 0
    lengths[1 + torch.randint(count - 1, ())] = longest
    return lengths.tolist()


# (path, GQA packing, query heads, KV heads): packed rows read K/V through descriptors, Q/O by pointers.
SHORT_CASES = [
    ("hopper", "0", 2, 2),
    ("hopper", "0", 4, 1),
    ("hopper", "1", 4, 2),
    ("ampere", "0", 2, 2),
    ("ampere", "0", 4, 1),
    ("ampere", "1", 4, 2),
    ("ampere", "1", 4, 1),
    ("ampere", "1", 8, 1),
]


@pytest.mark.parametrize("path,pack,heads_q,heads_kv", SHORT_CASES)
def test_short_packed_sequences(launches, monkeypatch, path, pack, heads_q, heads_kv):
    """Many short sequences (1..300 and empty ones), with and without GQA packing (GQA 1/2/4/8): the
    device-side schedule must give every (sequence, tile) a CTA and waste none on tiles past a sequence's
    end."""
    monkeypatch.setenv(launch.PATH_VARIABLE, path)
    monkeypatch.setenv(launch.PACK_GQA_VARIABLE, pack)
    lengths = short_lengths(8, 300 if heads_q == 2 else 100)
    total = sum(lengths)
    q, k, v = tensors((total, heads_q, 16), (total, heads_kv, 16), torch.bfloat16)
    check(*forward(q, k, v, cu_seqlens=offsets(lengths)), torch.bfloat16)
    flags = launches.flags
    packed = pack == "1" and heads_q > heads_kv
    assert flags["PACK_GQA"] == packed
    assert flags["SCHEDULE_BLOCK"] > 0
    assert_path(flags, path, torch.bfloat16, packed=packed)
    rows = [length * (heads_q // heads_kv if packed else 1) for length in lengths]
    tiles = sum(-(-r // launch.INTERPRETER_TILES[0]) for r in rows)
    launched = flags["grid"](dict(BLOCK_M=launch.INTERPRETER_TILES[0]))[0]
    assert tiles <= launched <= tiles + len(lengths), "the grid bounds the work items tightly"


def test_gqa_packing_fills_rows(launches, monkeypatch):
    """A 60-token sequence with 4 query heads per KV head is 240 rows: 8 tiles of 32 rows per KV head,
    against 2 tiles x 4 heads = 8 tiles of which the last of each head is half empty unpacked."""
    monkeypatch.setenv(launch.PACK_GQA_VARIABLE, "1")
    q, k, v = tensors((60, 8, 16), (60, 2, 16), torch.float32)
    check(*forward(q, k, v, cu_seqlens=offsets([60])), torch.float32)
    grid = launches.flags["grid"](dict(BLOCK_M=32))
    assert grid[1] == 2 and grid[0] == 8


def test_packed_padded_batches(path, launches, monkeypatch):
    """GQA packing on a padded batch with a key mask (query rows masked through their token)."""
    monkeypatch.setenv(launch.PACK_GQA_VARIABLE, "1")
    q, k, v = tensors((2, 45, 4, 16), (2, 45, 1, 16), torch.float32)
    check(*forward(q, k, v, key_padding_mask("holes", 2, 45), window=(6, 3)), torch.float32)
    assert launches.flags["PACK_GQA"] and not launches.flags["TMA"]


@pytest.mark.parametrize("count", [70])
def test_more_sequences_than_one_schedule_chunk(path, launches, count):
    """Beyond SCHEDULE_CHUNK sequences the schedule loops over chunks (a warp-specialized kernel, which
    may hold no second loop, takes the padded grid instead)."""
    assert count > attention_fwd.SCHEDULE_CHUNK
    lengths = short_lengths(count, 12)
    total = sum(lengths)
    q, k, v = tensors((total, 1, 16), (total, 1, 16), torch.bfloat16)
    check(*forward(q, k, v, cu_seqlens=offsets(lengths)), torch.bfloat16)
    expect_schedule = not specialized(path, torch.bfloat16)
    assert (launches.flags["SCHEDULE_BLOCK"] > 0) == expect_schedule


@triton.jit
def _schedule_kernel(
    CuSeqlensQ, Items, num_seqs, ROWS_PER_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr, SCHEDULE_BLOCK: tl.constexpr
):
    """Items[w] = (sequence, row tile) `scheduled_tile` gives work item w, in one chunk and chunk by chunk."""
    work = tl.program_id(0)
    for one_chunk in tl.static_range(2):
        if one_chunk == 0 or num_seqs <= SCHEDULE_BLOCK:
            seq, tile = attention_fwd.scheduled_tile(
                CuSeqlensQ, num_seqs, work, ROWS_PER_TOKEN, BLOCK_M, SCHEDULE_BLOCK, one_chunk == 1
            )
            tl.store(Items + 4 * work + 2 * one_chunk, seq)
            tl.store(Items + 4 * work + 2 * one_chunk + 1, tile)


@pytest.mark.parametrize("count,rows_per_token", [(5, 1), (16, 4), (64, 2), (70, 2)])
def test_schedule_numbers_every_tile_in_order(count, rows_per_token):
    """The device-side schedule (its prefix sums in two levels, `inclusive_sums`) against the host's count:
    work item w is tile w - (tiles before s) of the sequence s it falls in, empty sequences skipped, and past
    the last tile the sequence is `count`. One chunk (the warp-specialized kernel's) and the chunk loop agree."""
    lengths = short_lengths(count, 40)
    block_m = 64  # sequences of 1 to 3 tiles
    schedule_block = min(triton.next_power_of_2(max(count, 16)), attention_fwd.SCHEDULE_CHUNK)
    ends = torch.tensor(lengths).mul(rows_per_token).add(block_m - 1).div(block_m, rounding_mode="floor").cumsum(0)
    items = int(ends[-1]) + 3
    got = torch.full((items, 2, 2), -1, dtype=torch.int32)
    _schedule_kernel[(items,)](offsets(lengths), got, count, rows_per_token, block_m, schedule_block)
    work = torch.arange(items)
    seq = (ends[None, :] <= work[:, None]).sum(1)
    first = torch.where(seq > 0, ends[(seq - 1).clamp(min=0)], 0)
    expected = torch.stack([seq, work - first], 1).int()
    assert torch.equal(got[:, 0], expected), "the chunk loop"
    if count <= schedule_block:
        assert torch.equal(got[:, 1], expected), "one chunk"


def misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """The same values one element past a 16-byte boundary: no TMA descriptor can address them."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    view = storage[1:].view(tensor.shape)
    view.copy_(tensor)
    return view


@pytest.mark.parametrize("which", ["q", "v"])
def test_unaligned_inputs_take_the_pointer_path(launches, monkeypatch, which):
    monkeypatch.setenv(launch.PATH_VARIABLE, "hopper")
    monkeypatch.setenv(launch.PACK_GQA_VARIABLE, "0")
    q, k, v = tensors((50, 4, 16), (50, 2, 16), torch.float16)
    check(*forward(q, k, v, cu_seqlens=offsets([20, 30])), torch.float16)
    assert launches.flags["HOPPER"], "aligned inputs take the Hopper path"
    if which == "q":
        q = misaligned(q)
    else:
        v = misaligned(v)
    assert not launch.tma_aligned(q, k, v)
    check(*forward(q, k, v, cu_seqlens=offsets([20, 30])), torch.float16)
    assert not launches.flags["HOPPER"] and not launches.flags["TMA"]


def test_unaligned_masked_inputs_take_the_pointer_path(launches, monkeypatch):
    monkeypatch.setenv(launch.PATH_VARIABLE, "hopper")
    q, k, v = tensors((2, 30, 2, 16), (2, 30, 1, 16), torch.float16)
    mask = key_padding_mask("holes", 2, 30)
    check(*forward(misaligned(q), k, v, mask), torch.float16)
    assert not launches.flags["TMA"]


def test_tma_alignment_rule():
    x = torch.randn(4, 10, 3, 16, dtype=torch.float16)
    assert launch.tma_aligned(x)
    assert launch.tma_aligned(x.transpose(1, 2).contiguous().transpose(1, 2))  # (B, H, S, D) storage
    assert not launch.tma_aligned(torch.randn(4, 10, 3, 12, dtype=torch.float16))  # 24-byte rows
    assert launch.tma_aligned(x[:, :, :, :8])  # 16-byte rows, 96 bytes apart
    assert launch.tma_aligned(x[:, ::2])  # every other token: strides stay multiples of 16 bytes
    assert not launch.tma_aligned(x.expand(4, 10, 3, 16)[:, :1].expand(4, 10, 3, 16))  # broadcast tokens


def test_path_choice_is_checked(monkeypatch):
    monkeypatch.setenv(launch.PATH_VARIABLE, "volta")
    with pytest.raises(ValueError, match="LLM2VEC_FAST_TRITON_PATH"):
        launch.hopper_path(torch.device("cpu"))
    monkeypatch.setenv(launch.PATH_VARIABLE, "auto")
    assert not launch.hopper_path(torch.device("cpu"))


@pytest.mark.parametrize(
    "path,layout",
    [
        ("hopper", "varlen_tail"),
        ("hopper", "padded_holes"),
        ("ampere", "varlen_tail"),
        ("ampere", "padded_holes"),
        ("ampere", "window_edge"),
    ],
)
def test_unseen_nonfinite_values_stay_out(monkeypatch, path, layout):
    """Keys no row sees hold NaN/inf (padding keys, tokens past the last sequence, keys outside every
    window): TMA tiles read padding keys' K (their scores masked) but never their V (masked batches read V by
    pointers), nor keys past the sequence (descriptors end there); pointer tiles mask them (window edges:
    the redo); the outputs are the clean inputs' ones. Windows take the pointer path whatever the path asked
    for."""
    monkeypatch.setenv(launch.PATH_VARIABLE, path)
    seqlen_q, mask, cu, window = 70, None, None, (-1, -1)
    if layout == "window_edge":
        seqlen_q, window = 20, (4, 4)  # bottom-right aligned: rows see keys 16..43 of 40, keys 0..15 none
    q, k, v = tensors((2, seqlen_q, 2, 16), (2, 70 if layout != "window_edge" else 40, 1, 16), torch.float16)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    if layout == "padded_holes":
        mask = key_padding_mask("holes", 2, 70)
        poisoned_k[~mask], poisoned_v[~mask] = float("inf"), float("nan")
    elif layout == "varlen_tail":
        q, k, v, poisoned_k, poisoned_v = (t.flatten(0, 1) for t in (q, k, v, poisoned_k, poisoned_v))
        cu = offsets([37, 23])  # tokens 60.. belong to no sequence
        poisoned_k[60:], poisoned_v[60:] = float("nan"), float("inf")
    else:
        poisoned_v[:, :16] = float("nan")
    (out, lse), _ = forward(q, poisoned_k, poisoned_v, mask, cu, window=window)
    _, (ref_out, ref_lse) = forward(q, k, v, mask, cu, window=window)
    if cu is not None:
        out, lse = out[:60], lse[:, :60]
    check((out, lse), (ref_out, ref_lse), torch.float16)
