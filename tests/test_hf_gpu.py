"""GPU: the HF integration in bf16 at real widths (a few layers of 7B/8B/Gemma-2-shaped models) vs SDPA/eager."""

from __future__ import annotations

import copy

import pytest
import torch

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.hf import enable_bidirectional, pack_batch
from llm2vec_fast.tiny import build_tokenizer, tiny_config

pytestmark = pytest.mark.gpu

WIDE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    vocab_size=1024,
)
LENGTHS = [300, 17, 120, 64, 1]


def _model(family: str, layers: int = 2, **overrides):
    from transformers import AutoModel

    settings = {**WIDE, **overrides}
    config = tiny_config(family, settings.pop("vocab_size"), num_hidden_layers=layers, **settings)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModel.from_config(copy.deepcopy(config), dtype=torch.bfloat16).eval()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(LENGTHS)
    ids = torch.randint(3, vocab, (len(LENGTHS), width), device="cuda")
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long, device="cuda")
    for row, length in enumerate(LENGTHS):
        mask[row, width - length :] = 1  # left padding, as llm2vec pads
    return ids, mask


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _reference(model, implementation: str):
    reference = copy.deepcopy(model).float()
    reference.set_attn_implementation(implementation)
    reference.config.is_causal = False
    return reference


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_bf16_packed_and_padded_match_fp32_sdpa(family: str) -> None:
    model = _model(family)
    ids, mask = _batch(model.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        expected = _reference(model, "sdpa")(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        sdpa = copy.deepcopy(model)
        sdpa.set_attn_implementation("sdpa")
        sdpa.config.is_causal = False
        baseline = _relative(sdpa(input_ids=ids, attention_mask=mask).last_hidden_state[real], expected)
        enable_bidirectional(model)
        packed = pack_batch(ids, mask)
        ours_packed = packed.pad(model(**packed.model_inputs()).last_hidden_state)[real]
        ours_padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    for ours in (ours_packed, ours_padded):
        error = _relative(ours, expected)
        assert error < 1e-2 and error < 3 * baseline + 1e-3, (error, baseline)


def test_bf16_lora_gradients_match_fp32_sdpa() -> None:
    from peft import LoraConfig, get_peft_model

    model = _model("mistral")
    reference = _reference(model, "sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    ours = get_peft_model(enable_bidirectional(model), copy.deepcopy(lora))
    theirs = get_peft_model(reference, copy.deepcopy(lora))
    theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    ids, mask = _batch(model.config.vocab_size)
    real = mask.bool()
    weights = torch.randn(*ids.shape, model.config.hidden_size, device="cuda")
    packed = pack_batch(ids, mask)
    (packed.pad(ours(**packed.model_inputs()).last_hidden_state).float() * weights)[real].sum().backward()
    (theirs(input_ids=ids, attention_mask=mask).last_hidden_state * weights)[real].sum().backward()
    expected = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    actual = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        assert _relative(actual[name], expected[name]) < 5e-2, name


def test_gemma2_shaped_softcap_matches_fp32_eager() -> None:
    model = _model(
        "gemma2",
        layers=2,
        hidden_size=3584,
        intermediate_size=14336,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
    )
    ids, mask = _batch(model.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        expected = _reference(model, "eager")(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        enable_bidirectional(model)
        packed = pack_batch(ids, mask)
        ours = packed.pad(model(**packed.model_inputs()).last_hidden_state)[real]
    assert _relative(ours, expected) < 2e-2


def test_bf16_embeddings_do_not_depend_on_the_batch() -> None:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    encoder = LLM2Vec(enable_bidirectional(_model("mistral", vocab_size=len(tokenizer))), tokenizer)
    texts = ["A man is playing a guitar.", "Paris", "The quick brown fox jumps over the lazy dog. " * 20]
    alone = torch.stack([encoder.encode(t, show_progress_bar=False, device="cuda") for t in texts])
    together = encoder.encode(texts, show_progress_bar=False, device="cuda")
    with_company = encoder.encode(texts + ["another text " * 50] * 5, show_progress_bar=False, device="cuda")[:3]
    for batch in (together, with_company):
        cosine = torch.nn.functional.cosine_similarity(batch, alone, dim=-1)
        assert cosine.min() > 0.9999 and _relative(batch, alone) < 1e-2
