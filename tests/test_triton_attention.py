"""Triton kernels (interpreter on CPU, real kernels on a GPU) against the float64 oracle.

Forward output, log-sum-exp and all three gradients on fresh random inputs, every output buffer
NaN-poisoned before the kernels run (see attention_cases.check for what is compared).
"""

import pytest
import torch
import triton
import triton.language as tl
from attention_cases import MASK_KINDS, check, key_padding_mask, padded_case, run_public_api, varlen_case
from oracle import assert_close, attention_oracle

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func
from llm2vec_fast.kernels.launch import INTERPRETING
from llm2vec_fast.kernels.tiles import convert

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def check_triton(case, device, with_dlse=False):
    check(case, run_public_api(case, "triton", device, with_dlse=with_dlse), with_dlse)


@pytest.mark.parametrize("seqlen", [1, 17, 64, 129, 300])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_padding(kernel_device, seqlen, mask_kind, causal):
    check_triton(padded_case(2, seqlen, seqlen, 2, 1, 32, torch.float32, mask_kind, causal=causal), kernel_device)


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 2), (4, 1), (8, 1)])
def test_gqa_ratios(kernel_device, heads_q, heads_kv):
    check_triton(padded_case(2, 33, 33, heads_q, heads_kv, 16, torch.float32, "holes"), kernel_device)


@pytest.mark.parametrize("head_dim", [8, 24, 64, 80, 96, 128, 256])
def test_head_dims(kernel_device, head_dim):
    case = padded_case(1, 40, 40, 2, 1, head_dim, torch.float32, "right", causal=head_dim % 3 == 0)
    check_triton(case, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(kernel_device, dtype, causal):
    check_triton(padded_case(2, 65, 65, 4, 2, 64, dtype, "holes", causal=causal), kernel_device)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 40), (40, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths(kernel_device, seqlen_q, seqlen_k, causal):
    """Sq != Sk: the mask covers keys only; causal is aligned bottom-right."""
    check_triton(padded_case(2, seqlen_q, seqlen_k, 2, 1, 16, torch.float32, "right", causal=causal), kernel_device)


@pytest.mark.parametrize(
    "window_size,softcap,causal",
    [((5, 9), 0.0, False), ((12, -1), 0.0, True), ((-1, 3), 0.0, False), ((-1, -1), 2.5, False), ((7, 7), 4.0, True)],
)
def test_window_and_softcap(kernel_device, window_size, softcap, causal):
    case = padded_case(
        2, 70, 70, 2, 1, 16, torch.float32, "holes", causal=causal, window_size=window_size, softcap=softcap
    )
    check_triton(case, kernel_device)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_uneven(kernel_device, causal):
    lengths_q = [1, 17, 0, 64, 129, 5]
    lengths_k = [1, 17, 3, 64, 129, 9] if causal else lengths_q
    check_triton(varlen_case(lengths_q, lengths_k, 4, 2, 32, torch.float32, causal=causal), kernel_device)


@pytest.mark.parametrize("mask_kind", ["left", "empty_row"])
def test_lse_gradient(kernel_device, mask_kind):
    """A loss on the log-sum-exp (as ring attention uses) flows back through dlse."""
    check_triton(padded_case(2, 37, 37, 2, 1, 16, torch.float32, mask_kind), kernel_device, with_dlse=True)


def test_long_padding_gaps_are_skipped_correctly(kernel_device):
    """Gaps of 64+ padding keys split a row into several spans; shorter holes stay inside one."""
    case = padded_case(2, 300, 300, 2, 1, 16, torch.float32, "none")
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, 20:90] = False  # 70 keys: skipped
    mask[0, 150:160] = False  # 10 keys: masked
    mask[1, :100] = False
    mask[1, 200:299] = False
    case.key_mask = mask
    check_triton(case, kernel_device)


def test_strided_inputs(kernel_device):
    """(B, H, S, D) tensors transposed to (B, S, H, D), as Hugging Face hands them over, need no copy."""
    q, k, v = (torch.randn(2, 3, 29, 16, device=kernel_device).transpose(1, 2) for _ in range(3))
    mask = key_padding_mask("right", 2, 29)
    out = flash_attn_func(q, k, v, mask.to(kernel_device), backend="triton")
    ref, _ = attention_oracle(q, k, v, key_mask=mask)
    assert out.is_contiguous()
    assert_close(out.cpu(), ref, torch.float32, "out")


def test_padded_equals_varlen_equals_single_sequences(kernel_device):
    lengths = [23, 5, 40]
    seqlen = max(lengths)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, seqlen - length :] = True  # left padding
    q, k, v = (torch.randn(len(lengths), seqlen, 4, 16, device=kernel_device) for _ in range(3))
    padded = flash_attn_func(q, k, v, mask.to(kernel_device), backend="triton")
    flat_mask = mask.flatten().to(kernel_device)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(kernel_device)
    packed = flash_attn_varlen_func(
        *(t.flatten(0, 1)[flat_mask] for t in (q, k, v)), cu, cu, seqlen, seqlen, backend="triton"
    )
    torch.testing.assert_close(padded.flatten(0, 1)[flat_mask], packed, rtol=1e-5, atol=1e-6)
    for row, length in enumerate(lengths):
        alone = flash_attn_func(*(t[row : row + 1, seqlen - length :] for t in (q, k, v)), backend="triton")
        torch.testing.assert_close(padded[row, seqlen - length :], alone[0], rtol=1e-5, atol=1e-6)


def test_mask_edited_in_place_is_seen(kernel_device):
    """Key spans are cached per mask tensor across calls (one per layer); an in-place edit must not reuse them."""
    q, k, v = (torch.randn(2, 90, 2, 16, device=kernel_device) for _ in range(3))
    mask = torch.ones(2, 90, dtype=torch.bool, device=kernel_device)
    mask[0, 10:80] = False  # a gap long enough to split the row into two spans
    flash_attn_func(q, k, v, mask, backend="triton")
    mask[0, 10:80] = True  # stale spans would skip these keys
    out = flash_attn_func(q, k, v, mask, backend="triton")
    ref, _ = attention_oracle(q.cpu(), k.cpu(), v.cpu(), key_mask=mask.cpu())
    assert_close(out.cpu(), ref, torch.float32, "out")


@triton.jit
def _convert_kernel(X, Y, N: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, convert(tl.load(X + offs), Y.dtype.element_ty, UPCAST))


def test_bf16_conversion_rounds_to_nearest_even(kernel_device):
    """Kernels store bf16 as a GPU does, bit for bit, interpreter included (it truncates on its own):
    ties, values just below a tie, NaN, +-inf, overflow to inf, subnormals, and a wide random range."""
    special = [
        1.0078124,
        1.00390625,
        1.01171875,
        -1.0078124,
        1.00390626,
        float("nan"),
        float("inf"),
        float("-inf"),
        3.4e38,
        -3.4e38,
        3.3895e38,
        1e-40,
        -3e-39,
        0.0,
        -0.0,
        1.0,
    ]
    wide = torch.randn(1024 - len(special)) * torch.logspace(-44, 38, 1024 - len(special))
    x = torch.cat([torch.tensor(special), wide]).to(kernel_device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=kernel_device)
    _convert_kernel[(1,)](x, y, N=x.numel(), UPCAST=INTERPRETING)
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{(~same).sum().item()} values rounded differently, e.g. {x[~same][:4].tolist()}"
