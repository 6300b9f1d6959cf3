"""pack_batch / pack_sequences: unpad once, positions per sequence, exact round trips."""

from __future__ import annotations

import pytest
import torch

from llm2vec_fast import flash_attn_varlen_func
from llm2vec_fast.hf import pack_batch, pack_sequences


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 0, 13]])
    return ids, (ids != 0).long()


def test_pack_batch_layout() -> None:
    ids, mask = _left_padded()
    packed = pack_batch(ids, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 3, 8, 9]
    assert packed.max_seqlen == 5 and packed.seqlens.tolist() == [3, 5, 1]
    assert (packed.batch_size, packed.seqlen, packed.num_tokens) == (3, 5, 9)
    inputs = packed.model_inputs()
    assert inputs["cu_seq_lens_q"] is packed.cu_seqlens and inputs["max_length_k"] == 5
    assert "attention_mask" not in inputs


def test_pad_and_unpad_round_trip() -> None:
    ids, mask = _left_padded()
    packed = pack_batch(ids, mask)
    values = torch.randn(3, 5, 4)
    repacked = packed.unpad(values)
    assert repacked.shape == (1, 9, 4)
    restored = packed.pad(repacked)
    assert torch.equal(restored[mask.bool()], values[mask.bool()])
    assert (restored[~mask.bool()] == 0).all()
    assert torch.equal(packed.pad(repacked[0]), restored)
    assert torch.equal(packed.pad(packed.input_ids), ids)


def test_no_mask_means_no_padding() -> None:
    ids = torch.arange(6).view(2, 3)
    packed = pack_batch(ids)
    assert packed.cu_seqlens.tolist() == [0, 3, 6] and packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]


def test_pack_sequences_matches_right_padded_pack_batch() -> None:
    sequences = [[4, 5], [6, 7, 8, 9], [], [10]]
    direct = pack_sequences(sequences)
    width = 4
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    via_mask = pack_batch(ids, mask)
    for name in ("input_ids", "position_ids", "cu_seqlens", "indices"):
        assert torch.equal(getattr(direct, name), getattr(via_mask, name)), name
    assert (direct.max_seqlen, direct.batch_size, direct.seqlen) == (4, 4, 4)


def test_packed_offsets_work_under_inference_mode() -> None:
    """sentence-transformers encodes under torch.inference_mode, where offsets are inference tensors."""
    ids, mask = _left_padded()
    with torch.inference_mode():
        for packed in (pack_batch(ids, mask), pack_sequences([[1, 2], [3]])):
            q = torch.randn(packed.num_tokens, 2, 16)
            for _ in range(2):  # the second call reuses the offsets' cached check
                out = flash_attn_varlen_func(
                    q, q, q, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen
                )
                assert out.shape == q.shape and torch.isfinite(out).all()
        bad = torch.tensor([0, 3, 2], dtype=torch.int32)
        with pytest.raises(ValueError, match="non-decreasing"):
            flash_attn_varlen_func(q, q, q, bad, bad, 3, 3)


def test_bad_inputs() -> None:
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match="batch, seqlen"):
        pack_batch(ids[0], mask[0])
    with pytest.raises(TypeError, match="integer token ids"):
        pack_batch(ids.float(), mask)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_batch(ids.tolist(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        pack_batch(ids, mask[:, :3])
    packed = pack_batch(ids, mask)
    with pytest.raises(ValueError, match="9 packed tokens"):
        packed.pad(torch.zeros(8, 2))
    with pytest.raises(ValueError, match=r"\(3, 5, \.\.\.\)"):
        packed.unpad(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([])


@pytest.mark.parametrize("pack", ["sequences", "batch"])
def test_offsets_made_under_inference_mode_are_checked_once_per_forward(pack, monkeypatch) -> None:
    """Inference tensors cannot be cached (no version counter): the packed offsets must not be one,
    or every layer checks them again (a host sync per layer on a GPU)."""
    from llm2vec_fast import validation
    from llm2vec_fast.hf import enable_bidirectional
    from llm2vec_fast.tiny import build_tiny_model

    model, _ = build_tiny_model("llama")
    decoder = enable_bidirectional(model.model)
    checks = []
    original = validation._check_offsets
    monkeypatch.setattr(validation, "_check_offsets", lambda *args: checks.append(args) or original(*args))
    with torch.inference_mode():
        if pack == "sequences":
            packed = pack_sequences([[5, 6, 7], [8, 9]])
        else:
            packed = pack_batch(
                torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
            )
        assert not packed.cu_seqlens.is_inference()
        decoder(**packed.model_inputs())
    assert decoder.config.num_hidden_layers > 1 and len(checks) == 1
