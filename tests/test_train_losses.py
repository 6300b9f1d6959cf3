"""The MNTP and contrastive losses against straightforward float64 references; masking rates and label shift,
counted."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.tiny import build_tokenizer
from llm2vec_fast.training.data.batches import MNTPBatch
from llm2vec_fast.training.data.masking import MaskingRule, add_mask_token, masking_rule, prediction_targets
from llm2vec_fast.training.losses import contrastive_loss_sum, masked_token_loss_sum


def _relative_error(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_lm_head_loss_matches_reference(chunk_size, softcap, train_head):
    torch.manual_seed(chunk_size)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16).mul_(0.5).requires_grad_(train_head)
    targets = torch.randint(0, 50, (23,))
    loss = masked_token_loss_sum(hidden, weight, targets, chunk_size=chunk_size, softcap=softcap)
    (loss * 0.7).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.7).backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss, reference = float(loss.detach()), float(reference.detach())
    assert abs(loss - reference) / reference < 1e-6
    assert _relative_error(hidden.grad, h64.grad) < 1e-5
    if train_head:
        assert _relative_error(weight.grad, w64.grad) < 1e-5
    else:
        assert weight.grad is None


def test_chunked_lm_head_loss_in_bfloat16_and_empty():
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    targets = torch.randint(0, 64, (40,))
    loss = masked_token_loss_sum(hidden, weight, targets, chunk_size=16)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    reference = F.cross_entropy(h64 @ weight.double().t(), targets, reduction="sum")
    reference.backward()
    assert abs(float(loss.detach()) - float(reference.detach())) / float(reference.detach()) < 1e-2
    assert hidden.grad.dtype == torch.bfloat16 and _relative_error(hidden.grad, h64.grad) < 1e-2
    empty = masked_token_loss_sum(hidden[:0], weight, targets[:0])
    empty.backward()
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="share H"):
        masked_token_loss_sum(hidden, weight[:, :8], targets)


def _official_hard_negative_nll(q, d_pos, d_neg, scale):
    """LLM2Vec's HardNegativeNLLLoss (one process): mean CE over scale * cos(q, [positives; negatives])."""
    documents = torch.cat([d_pos, d_neg])
    scores = F.normalize(q, dim=1) @ F.normalize(documents, dim=1).t() * scale
    return F.cross_entropy(scores, torch.arange(len(q)))


@pytest.mark.parametrize("negatives", [0, 6])
def test_contrastive_loss_is_the_official_loss_times_batch(negatives):
    torch.manual_seed(negatives)
    q, p, n = (
        torch.randn(6, 24, requires_grad=True),
        torch.randn(6, 24, requires_grad=True),
        torch.randn(negatives, 24, requires_grad=True),
    )
    loss = contrastive_loss_sum(q, p, n, scale=50.0)
    loss.backward()
    q64, p64, n64 = (t.detach().double().requires_grad_() for t in (q, p, n))
    reference = _official_hard_negative_nll(q64, p64, n64, 50.0) * 6
    reference.backward()
    assert abs(float(loss.detach()) - float(reference.detach())) / float(reference.detach()) < 1e-5
    for ours, ref in ((q, q64), (p, p64)) + (((n, n64),) if negatives else ()):
        assert _relative_error(ours.grad, ref.grad) < 1e-5
    with pytest.raises(ValueError, match="queries and positives"):
        contrastive_loss_sum(q, p[:3], n, 20.0)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    add_mask_token(tok, "blank")
    return tok


@pytest.mark.parametrize("strategy, probability", [("default", 0.2), ("all_mask", 0.8)])
def test_masking_rates_are_what_they_claim(tokenizer, strategy, probability):
    rule = masking_rule(tokenizer, probability, strategy)
    rng = np.random.default_rng(0)
    special = tokenizer.bos_token_id
    ids = rng.integers(3, len(tokenizer), size=200_000)
    ids[::10] = special  # specials are never masked
    corrupted, selected = rule.apply(ids, rng)
    candidates = ids != special
    assert not selected[~candidates].any() and np.array_equal(corrupted[~selected], ids[~selected])
    rate = selected.sum() / candidates.sum()
    sigma = np.sqrt(probability * (1 - probability) / candidates.sum())
    assert abs(rate - probability) < 5 * sigma
    chosen = selected.sum()
    as_mask = (corrupted[selected] == rule.mask_token_id).sum() / chosen
    unchanged = (corrupted[selected] == ids[selected]).sum() / chosen
    if strategy == "all_mask":
        assert as_mask == 1.0
    else:
        assert abs(as_mask - 0.8) < 0.01 and abs(unchanged - 0.1 - 0.1 / len(tokenizer)) < 0.01
        assert abs(1 - as_mask - unchanged - 0.1) < 0.01  # replaced by a random other token


def test_mask_token_choices(tokenizer):
    assert tokenizer.mask_token == "_" and tokenizer.convert_tokens_to_ids("_") == tokenizer.mask_token_id
    eos = build_tokenizer()
    assert add_mask_token(eos, "eos") is False and eos.mask_token_id == eos.eos_token_id
    new = build_tokenizer()
    before = len(new)
    assert add_mask_token(new, "mask") is True and len(new) == before + 1 and new.mask_token == "<mask>"
    with pytest.raises(ValueError, match="mask_token_type must be"):
        add_mask_token(build_tokenizer(), "star")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MaskingRule(0.2, "default", 10_000, 100, np.zeros(0, dtype=np.int64))


def test_label_shift_targets_the_masked_token_from_the_position_before(tokenizer):
    rule = masking_rule(tokenizer, 0.5, "all_mask")
    rng = np.random.default_rng(3)
    sequences, originals, rows, cols, ids = [], [], [], [], []
    for row, length in enumerate([7, 1, 12, 5]):
        original = rng.integers(3, len(tokenizer), size=length)
        original[0] = tokenizer.bos_token_id
        corrupted, selected = rule.apply(original, rng)
        targets = prediction_targets(selected)
        assert (targets >= 1).all() and set(targets) == set(np.flatnonzero(selected))  # position 0 is BOS: never masked
        sequences.append(corrupted.tolist())
        originals.append(original)
        rows.append(np.full(len(targets), row))
        cols.append(targets)
        ids.append(original[targets])
    batch = MNTPBatch(sequences, np.concatenate(rows), np.concatenate(cols), np.concatenate(ids))
    packed = np.concatenate([np.asarray(s) for s in sequences])
    for source, row, col, target in zip(batch.packed_sources(), batch.target_rows, batch.target_cols, batch.target_ids):
        start = sum(len(s) for s in sequences[:row])
        assert source == start + col - 1 and packed[source + 1] == rule.mask_token_id and originals[row][col] == target
    padded = batch.padded_sources(12)
    assert np.array_equal(padded, batch.target_rows * 12 + batch.target_cols - 1)
    unselected = np.zeros(5, dtype=bool)
    unselected[0] = True
    assert prediction_targets(unselected).size == 0  # a masked first token has no previous position
