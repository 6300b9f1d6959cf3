"""The two losses of the LLM2Vec recipe, written to save memory and to scale across processes.

- MNTP: cross-entropy of ``lm_head(hidden)`` at the masked positions only, in chunks, with the
  gradient computed during the forward pass, so the ``(masked_tokens, vocab)`` logits never exist
  in full (a 32k vocabulary at 16k masked tokens would otherwise need 2 GiB in float32).
- Contrastive (SimCSE and supervised): cross-entropy over scaled cosine similarities of each
  query with every positive and hard negative of the batch, documents gathered from all
  processes with their gradients so the negatives grow with the number of GPUs.

Both return a *sum* over loss terms; the trainer divides by the global number of terms, which
makes gradients identical whatever the split across processes or micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .process_group import gather_with_grad


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of CE(hidden @ weight.T, targets), gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, softcap: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = hidden[start : start + chunk_size]
            logits = (rows @ weight.t()).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            chunk_targets = targets[start : start + chunk_size]
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits[torch.arange(rows.shape[0], device=rows.device), chunk_targets] -= 1.0
            if softcap:
                grad_logits *= 1.0 - capped.square()
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def masked_token_loss_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096, softcap: float | None = None
) -> Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)`` (float32), never materialising all logits.

    Args:
        hidden: ``(N, H)`` hidden states of the positions that predict a masked token.
        weight: ``(V, H)`` the LM head (frozen or trainable).
        targets: ``(N,)`` int64 original token ids.
        chunk_size: rows per chunk; peak extra memory is ``chunk_size * V`` floats.
        softcap: if set, logits are capped to ``softcap * tanh(logits / softcap)`` first (Gemma 2's
            ``final_logit_softcapping``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) must share H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:
        return (hidden @ weight.t()).float().sum()  # zero, but keeps both inputs in the graph (DDP)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, float(softcap or 0.0))


def contrastive_loss_sum(queries: Tensor, positives: Tensor, negatives: Tensor, scale: float) -> Tensor:
    """Sum over this process's queries of CE(scale * cos(query, all documents), its positive).

    The documents are the positives then the hard negatives of every process (gathered with
    gradients), so query ``j`` of process ``r`` has its positive at column ``offset_r + j``. In one
    process this is LLM2Vec's ``HardNegativeNLLLoss`` times the batch size.

    Args:
        queries, positives: ``(B, H)`` embeddings of this process's queries and their positives.
        negatives: ``(M, H)`` hard negatives of this process (``M`` may be 0, or differ across processes).
        scale: inverse temperature (20 for SimCSE, 50 for supervised in LLM2Vec).
    """
    if queries.shape != positives.shape or queries.dim() != 2:
        raise ValueError(
            f"queries and positives must both be (B, H), got {tuple(queries.shape)} and {tuple(positives.shape)}"
        )
    if negatives.dim() != 2 or negatives.shape[1] != queries.shape[1]:
        raise ValueError(f"negatives must be (M, {queries.shape[1]}), got {tuple(negatives.shape)}")
    all_positives, offset = gather_with_grad(positives)
    all_negatives, _ = gather_with_grad(negatives)
    documents = F.normalize(torch.cat([all_positives, all_negatives]).float(), dim=-1)
    scores = scale * F.normalize(queries.float(), dim=-1) @ documents.t()
    labels = torch.arange(offset, offset + queries.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels, reduction="sum")
