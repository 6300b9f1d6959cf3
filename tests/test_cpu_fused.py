"""The fused CPU ops (llm2vec_fast.cpu_fused) against float64 and eager PyTorch, and their routing into HF models
(llm2vec_fast.hf.fused_cpu): which calls take them, that results do not change, and that everything else (autograd,
copies, threads, a failed build) behaves as before."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast import cpu_fused
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.hf import enable_bidirectional, pack_sequences, use_fused_cpu_ops
from llm2vec_fast.hf import fused_cpu as routing
from llm2vec_fast.tiny import FAMILIES, build_tiny_model

ROUTED = {  # family -> (RMSNorm modules, MLP modules) routed in a 2-layer tiny model; rotary by ROTARY_MODULES
    "llama": (5, 2),
    "mistral": (5, 2),
    "qwen2": (5, 2),
    "qwen3": (9, 2),  # q_norm and k_norm too
    "phi3": (5, 2),
    "granite": (5, 2),
    "olmo2": (9, 2),  # q_norm and k_norm too
    "gemma": (0, 0),  # RMSNorm with 1 + weight, GELU MLP
    "gemma2": (0, 0),
    "gemma3": (0, 0),
}


def test_the_ops_build_on_this_machine() -> None:
    assert cpu_fused.unavailable_reason() is None


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


@pytest.fixture
def threads():
    """Runs the body with 1 and then 2 torch threads (the ops split work as torch's own kernels do)."""
    before = torch.get_num_threads()
    yield lambda count: torch.set_num_threads(count)
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (3, 7), (33, 256), (2, 5, 257)])
def test_rms_norm_matches_float64(shape: tuple[int, ...], threads) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator) * 3
    weight = torch.randn(shape[-1], generator=generator)
    expected = _hf_rms_norm(x.double(), weight.double(), 1e-6)
    for count in (1, 2):
        threads(count)
        out = cpu_fused.rms_norm(x, weight, 1e-6)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(out, _hf_rms_norm(x, weight, 1e-6), rtol=1e-6, atol=1e-6)


def test_rms_norm_reads_views_and_propagates_nonfinite_rows() -> None:
    x = torch.randn(64, 24).t()  # (24, 64), last stride 24
    weight = torch.randn(64)
    torch.testing.assert_close(cpu_fused.rms_norm(x, weight, 1e-5), cpu_fused.rms_norm(x.contiguous(), weight, 1e-5))
    x = torch.randn(4, 16)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    out, eager = cpu_fused.rms_norm(x, weight[:16], 1e-5), _hf_rms_norm(x, weight[:16], 1e-5)
    torch.testing.assert_close(out, eager, equal_nan=True)
    assert out[1].isnan().all() and not out[[0, 3]].isnan().any()


@pytest.mark.parametrize("numel", [0, 5, 31, 700, 704, 65537, 2_213_984])
def test_silu_mul_is_eager_bit_for_bit(numel: int, threads) -> None:
    generator = torch.Generator().manual_seed(numel)
    gate, up = torch.randn(numel, generator=generator) * 4, torch.randn(numel, generator=generator)
    if numel >= 8:
        gate[:8] = torch.tensor([-100.0, 100.0, -1e30, 1e30, float("inf"), -float("inf"), float("nan"), 0.0])
    for count in (1, 2):
        threads(count)
        torch.testing.assert_close(cpu_fused.silu_mul(gate, up), F.silu(gate) * up, rtol=0, atol=0, equal_nan=True)
    expected = (gate.double() * torch.sigmoid(gate.double()) * up.double())[8:]
    torch.testing.assert_close(cpu_fused.silu_mul(gate, up).double()[8:], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "dim", "angle_batch"), [(1, 37, 4, 64, 1), (3, 17, 2, 6, 3), (2, 5, 3, 128, 1)]
)
def test_rotary_is_hf_bit_for_bit(batch: int, seq: int, heads: int, dim: int, angle_batch: int, threads) -> None:
    from transformers.models.llama import modeling_llama

    original = getattr(modeling_llama.apply_rotary_pos_emb, routing._ORIGINAL, modeling_llama.apply_rotary_pos_emb)
    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(batch, seq, heads, dim, generator=generator).transpose(1, 2)  # as HF hands it over: a view
    k = torch.randn(batch, seq, 1, dim, generator=generator).transpose(1, 2)
    cos, sin = (torch.randn(angle_batch, seq, dim, generator=generator) for _ in range(2))
    q_ref, k_ref = original(q, k, cos, sin)
    for count in (1, 2):
        threads(count)
        q_out, k_out = cpu_fused.rotary(q, cos, sin), cpu_fused.rotary(k, cos, sin)
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
        assert q_out.stride() == q.stride()
    half = dim // 2
    q64, cos64, sin64 = q.double(), cos.double()[:, None], sin.double()[:, None]
    rotated = torch.cat((-q64[..., half:], q64[..., :half]), dim=-1)
    torch.testing.assert_close(q_out.double(), q64 * cos64 + rotated * sin64, rtol=1e-6, atol=1e-6)


def test_ops_name_bad_input() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="x must be float32"):
        cpu_fused.rms_norm(x.double(), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        cpu_fused.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="gate and up must have the same shape"):
        cpu_fused.silu_mul(x, torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        cpu_fused.rotary(torch.randn(1, 2, 3, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        cpu_fused.rotary(torch.randn(2, 2, 3, 4), torch.randn(3, 3, 4), torch.randn(3, 3, 4))


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused ops the routed modules call (by name)."""
    calls: Counter = Counter()
    for name in ("rms_norm", "silu_mul", "rotary"):
        op = getattr(cpu_fused, name)

        def counted(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)

        monkeypatch.setattr(cpu_fused, name, counted)
    return calls


def _packed_inputs(model, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = (7, 1, 19)
    ids = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return pack_sequences(ids).model_inputs()


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_families_give_the_eager_hidden_states(family: str, fused_calls, monkeypatch) -> None:
    model, _ = build_tiny_model(family, seed=2)
    base = enable_bidirectional(model.model)
    eager = copy.deepcopy(base)
    norms, mlps = ROUTED[family]
    assert use_fused_cpu_ops(base) == norms + mlps
    assert use_fused_cpu_ops(base) == norms + mlps  # idempotent
    inputs = _packed_inputs(base)
    rotary_wrapped = type(base.layers[0].self_attn).__module__ in routing.ROTARY_MODULES
    assert rotary_wrapped == (family != "phi3")  # Phi-3 rotates part of each head
    with torch.inference_mode():
        fused = base(**inputs).last_hidden_state
        rotary = 2 * base.config.num_hidden_layers if rotary_wrapped else 0
        assert fused_calls == Counter(rms_norm=norms, silu_mul=mlps, rotary=rotary) - Counter()
        monkeypatch.setitem(cpu_fused._state, "reason", "switched off by the test")
        plain = eager(**inputs).last_hidden_state
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_autograd_keeps_the_eager_modules(fused_calls) -> None:
    model, _ = build_tiny_model("llama", seed=3)
    base = enable_bidirectional(model.model)
    reference = copy.deepcopy(base)
    use_fused_cpu_ops(base)
    inputs = _packed_inputs(base)
    for module in (base, reference):
        module(**inputs).last_hidden_state.square().sum().backward()
    assert sum(fused_calls.values()) == 0  # parameters require grad: nothing fused
    for (name, param), (_, ref_param) in zip(base.named_parameters(), reference.named_parameters()):
        assert torch.equal(param.grad, ref_param.grad), name
    with torch.no_grad():  # no graph recorded: fused, even though the parameters require grad
        base(**inputs)
    assert fused_calls["rms_norm"] > 0


def test_routed_model_copies_pickles_and_runs_on_other_dtypes(fused_calls) -> None:
    model, _ = build_tiny_model("qwen3", seed=5)
    base = enable_bidirectional(model.model)
    use_fused_cpu_ops(base)
    copied = copy.deepcopy(base)
    assert copied.layers[0].mlp.forward.module is copied.layers[0].mlp
    restored = pickle.loads(pickle.dumps(base))
    assert restored.norm.forward.module is restored.norm
    inputs = _packed_inputs(base)
    with torch.inference_mode():
        expected = base(**inputs).last_hidden_state
        for other in (copied, restored):
            torch.testing.assert_close(other(**inputs).last_hidden_state, expected, rtol=0, atol=0)
        calls = sum(fused_calls.values())
        bf16 = copy.deepcopy(base).to(torch.bfloat16)(**inputs).last_hidden_state  # not float32: eager modules
    assert sum(fused_calls.values()) == calls and bf16.dtype == torch.bfloat16
    assert F.cosine_similarity(bf16.float()[0], expected[0], dim=-1).min() > 0.99


def test_encoder_threads_and_a_failed_build(tmp_path, monkeypatch) -> None:
    model, tokenizer = build_tiny_model("llama", seed=6)
    encoder = LLM2Vec(enable_bidirectional(model.model), tokenizer, pooling_mode="mean")
    texts = [f"text number {i} " * (1 + i % 7) for i in range(24)]
    expected = encoder.encode(texts, batch_size=5, show_progress_bar=False)
    results: dict[int, torch.Tensor] = {}

    def encode(slot: int) -> None:
        results[slot] = encoder.encode(texts, batch_size=5 + slot, show_progress_bar=False)

    workers = [threading.Thread(target=encode, args=(slot,)) for slot in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for slot in range(3):
        torch.testing.assert_close(results[slot], expected, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(cpu_fused, "SOURCE_NAME", "missing_source.cpp")
    monkeypatch.setattr(cpu_fused, "_state", {})
    reason = cpu_fused.unavailable_reason()
    assert reason is not None and "could not be built" in reason
    torch.testing.assert_close(encoder.encode(texts, batch_size=5, show_progress_bar=False), expected)


def test_switch_turns_the_ops_off() -> None:
    code = "from llm2vec_fast import cpu_fused; print(cpu_fused.unavailable_reason())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, cpu_fused.ENV_SWITCH: "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"{cpu_fused.ENV_SWITCH}=0"
