"""Per-mask state is derived once per mask for every backend, and the kernels stand below the package."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import torch
from attention_cases import key_padding_mask

import llm2vec_fast.backends as backends
import llm2vec_fast.backends.cuda as cuda_backend
import llm2vec_fast.key_masks as key_masks
import llm2vec_fast.ops  # noqa: F401  (registers torch.ops.llm2vec_fast)

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _layers(backend: str, mask: torch.Tensor, layers: int = 3) -> None:
    """What a model does: forward and backward of every layer with the same mask."""
    q, k, v = (torch.randn(2, mask.shape[1], 2, 16) for _ in range(3))
    flat = (mask, None, None, mask.shape[1], mask.shape[1], False, -1, -1, 0.0, 0.25, False, backend)
    for _ in range(layers):
        out, lse = torch.ops.llm2vec_fast.attention_forward(q, k, v, *flat)
        torch.ops.llm2vec_fast.attention_backward(out, q, k, v, out, lse, None, *flat)


def _counting(monkeypatch, form: str) -> list:
    calls = []
    derive = key_masks._FORMS[form]
    monkeypatch.setitem(key_masks._FORMS, form, lambda mask: calls.append(mask) or derive(mask))
    return calls


def test_triton_key_spans_are_derived_once_per_mask(monkeypatch):
    calls = _counting(monkeypatch, "spans")
    _layers("triton", key_padding_mask("holes", 2, 24))
    assert len(calls) == 1


def test_cuda_binding_gets_the_mask_packed_once_per_mask(monkeypatch):
    """The binding used to pack the mask to bits on every forward and backward of every layer."""
    packed, bits_seen = [], []

    def fwd(q, k, v, key_bits, *args):
        bits_seen.append(key_bits)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[0], q.shape[2], q.shape[1])

    def bwd(dout, q, k, v, out, lse, dlse, key_bits, *args):
        bits_seen.append(key_bits)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)

    def pack_key_mask(mask):
        packed.append(mask)
        return torch.zeros(mask.shape[0], 4, dtype=torch.int32)

    monkeypatch.setattr(
        torch.ops, "llm2vec_fast_cuda", SimpleNamespace(fwd=fwd, bwd=bwd, pack_key_mask=pack_key_mask), raising=False
    )
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    monkeypatch.setitem(backends._loaded, "cuda", cuda_backend)
    mask = key_padding_mask("left", 2, 24)
    _layers("cuda", mask)
    assert len(packed) == 1 and packed[0] is mask
    assert len(bits_seen) == 6 and all(bits is bits_seen[0] for bits in bits_seen)


def test_an_edited_mask_is_derived_again(monkeypatch):
    calls = _counting(monkeypatch, "spans")
    mask = key_padding_mask("right", 2, 24)
    key_masks.derive(mask, "spans")
    mask[0, 3] = False
    key_masks.derive(mask, "spans")
    assert len(calls) == 2


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_kernels_import_nothing_from_the_package():
    """kernels/ (installed as llm2vec_fast.kernels) is the lowest layer: Triton code and its launchers."""
    for path in sorted(KERNELS.glob("*.py")):
        for module, level in _imported_modules(path):
            assert level <= 1 and not module.startswith("llm2vec_fast"), (path.name, module, level)


def test_hf_padded_forward_under_inference_mode_derives_spans_once(monkeypatch):
    """Inference tensors are never cached: the HF mask function hands every layer a normal copy instead."""
    from llm2vec_fast.hf import enable_bidirectional, route_attention
    from llm2vec_fast.tiny import build_tiny_model

    decoder = enable_bidirectional(build_tiny_model("llama")[0].model)
    route_attention(decoder, causal=False, backend="triton")
    calls = _counting(monkeypatch, "spans")
    with torch.inference_mode():
        ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        decoder(input_ids=ids, attention_mask=(ids != 0).long())
    assert decoder.config.num_hidden_layers > 1 and len(calls) == 1
