"""Pooling of packed and padded hidden states vs a per-sequence loop written from the definitions."""

from __future__ import annotations

import pytest
import torch

from llm2vec_fast.pooling import POOLING_MODES, pool_packed, pool_padded

LENGTHS = [5, 1, 7, 3]


def _reference(sequence: torch.Tensor, mode: str, instruction_length: int) -> torch.Tensor:
    """One sequence ``(n, H)``, float64, straight from the definitions."""
    sequence = sequence.double()
    if len(sequence) == 0:
        return torch.zeros(sequence.shape[1], dtype=torch.float64)
    if mode in ("eos_token", "last_token"):
        return sequence[-1]
    if mode == "bos_token":
        return sequence[0]
    pooled = sequence[instruction_length:] if instruction_length < len(sequence) else sequence
    if mode == "mean":
        return pooled.mean(0)
    weights = torch.arange(1, len(pooled) + 1, dtype=torch.float64)
    return (pooled * weights[:, None]).sum(0) / weights.sum()


def _packed(lengths: list[int], hidden: int = 6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(sum(lengths))
    states = torch.randn(sum(lengths), hidden, generator=generator).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return states, cu


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("instruction_lengths", [None, [2, 0, 3, 5]], ids=["all_tokens", "skip_instruction"])
def test_packed_matches_reference(mode: str, instruction_lengths: list[int] | None) -> None:
    states, cu = _packed(LENGTHS)
    out = pool_packed(states, cu, mode, None if instruction_lengths is None else torch.tensor(instruction_lengths))
    assert out.dtype == torch.float32 and out.shape == (4, 6)
    for row, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        expected = _reference(states[start:end], mode, 0 if instruction_lengths is None else instruction_lengths[row])
        torch.testing.assert_close(out[row].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
def test_padded_equals_packed(mode: str, left: bool) -> None:
    states, cu = _packed(LENGTHS)
    width = max(LENGTHS)
    padded = torch.full((4, width, 6), float("nan"))  # padding must never leak into a result
    mask = torch.zeros(4, width, dtype=torch.long)
    for row, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        columns = slice(width - (end - start), width) if left else slice(0, end - start)
        padded[row, columns] = states[start:end]
        mask[row, columns] = 1
    lengths = torch.tensor([1, 0, 2, 1])
    assert torch.equal(pool_padded(padded, mask, mode, lengths), pool_packed(states, cu, mode, lengths))


def test_empty_sequences_and_bf16_inputs() -> None:
    states, cu = _packed([3, 0, 2], dtype=torch.bfloat16)
    for mode in POOLING_MODES:
        out = pool_packed(states, cu, mode)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out[1] == 0).all()
    mean = pool_packed(states, cu, "mean")
    torch.testing.assert_close(mean[0], states[:3].float().mean(0))


def test_gradients_flow_to_pooled_tokens_only() -> None:
    states, cu = _packed(LENGTHS)
    states.requires_grad_(True)
    pool_packed(states, cu, "mean", torch.tensor([2, 0, 0, 0])).sum().backward()
    assert (states.grad[:2] == 0).all() and (states.grad[2:5] != 0).all()


def test_bad_arguments() -> None:
    states, cu = _packed(LENGTHS)
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        pool_packed(states, cu, "max")
    with pytest.raises(ValueError, match="instruction_lengths"):
        pool_packed(states, cu, "mean", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="instruction_lengths"):
        pool_packed(states, cu, "mean", torch.tensor([1.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="total_tokens, hidden"):
        pool_packed(states[None], cu, "mean")
