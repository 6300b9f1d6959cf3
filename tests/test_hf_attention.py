"""HF integration: every supported family, bidirectional and causal, padded and packed, vs HF eager attention."""

from __future__ import annotations

import copy

import pytest
import torch

from llm2vec_fast.hf import (
    ATTENTION_NAME,
    disable_bidirectional,
    enable_bidirectional,
    is_bidirectional,
    load_bidirectional,
    pack_batch,
    register,
)
from llm2vec_fast.tiny import MODELS, build_tiny_model

TOLERANCE = 1e-5  # fp32, relative to the hidden states' scale


def _batch(vocab: int, lengths: list[int], left: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, width - length :] = 1
        else:
            mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _models(family: str, causal: bool = False, **overrides):
    """(ours, HF eager reference) on the same random weights, both bidirectional unless `causal`.

    A natively bidirectional model (EmbeddingGemma) is its own reference as loaded; causal, it drops the flag.
    """
    model, _ = build_tiny_model(family, **overrides)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    if getattr(reference.config, "use_bidirectional_attention", False):
        reference.config.use_bidirectional_attention = not causal
    else:
        reference.config.is_causal = causal
    (disable_bidirectional if causal else enable_bidirectional)(model)
    return model, reference


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert torch.isfinite(actual).all()
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_and_packed_match_eager(family: str, causal: bool) -> None:
    model, reference = _models(family, causal)
    ids, mask = _batch(model.config.vocab_size, [7, 3, 5], left=True)
    real = mask.bool()
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = pack_batch(ids, mask)
        unpadded = packed.pad(model.model(**packed.model_inputs()).last_hidden_state)
        alone = [model.model(input_ids=ids[i : i + 1, real[i]]).last_hidden_state for i in range(3)]
    _assert_close(padded[real], expected[real])
    _assert_close(unpadded[real], expected[real])
    assert (unpadded[~real] == 0).all()
    for row, hidden in enumerate(alone):  # each sequence run on its own, no padding at all
        _assert_close(unpadded[row][real[row]], hidden[0])


def test_patched_model_compiles_with_fullgraph() -> None:
    """Other training stacks compile whole models: padded and packed forwards trace without a break."""
    model, reference = _models("mistral")
    ids, mask = _batch(model.config.vocab_size, [6, 2, 4], left=False)
    real = mask.bool()
    compiled = torch.compile(model.model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = pack_batch(ids, mask)
        unpadded = packed.pad(compiled(**packed.model_inputs()).last_hidden_state)
    _assert_close(padded[real], expected[real])
    _assert_close(unpadded[real], expected[real])


@pytest.mark.parametrize("family", MODELS)
def test_every_position_sees_later_tokens_and_no_padding(family: str) -> None:
    """Proves bidirectionality (the official llm2vec Qwen2 model is causal under eager/SDPA; ours is not)."""
    model, _ = build_tiny_model(family)
    enable_bidirectional(model)
    assert is_bidirectional(model)
    ids, mask = _batch(model.config.vocab_size, [6, 4], left=False)
    changed_last = ids.clone()
    changed_last[0, 5] = (ids[0, 5] + 1) % model.config.vocab_size
    changed_padding = ids.clone()
    changed_padding[1, 4:] = 7
    with torch.no_grad():
        base = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        after_last = model.model(input_ids=changed_last, attention_mask=mask).last_hidden_state
        after_padding = model.model(input_ids=changed_padding, attention_mask=mask).last_hidden_state
    moved = (after_last[0, :5] - base[0, :5]).abs().amax(dim=-1)
    assert (moved > 1e-4).all(), f"earlier positions unaffected by the last token: {moved}"
    assert torch.equal(after_last[1], base[1])
    assert torch.equal(after_padding[1, :4], base[1, :4])
    disable_bidirectional(model)
    with torch.no_grad():
        causal_base = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        causal_after = model.model(input_ids=changed_last, attention_mask=mask).last_hidden_state
    assert not is_bidirectional(model)
    assert torch.equal(causal_after[0, :5], causal_base[0, :5])


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_sliding_window_honoured_when_causal_ignored_when_bidirectional(family: str) -> None:
    ids, mask = _batch(384, [9, 6], left=False)
    real = mask.bool()
    for causal in (True, False):
        model, reference = _models(family, causal, sliding_window=3)
        if not causal:
            reference.config.sliding_window = None  # LLM2Vec: bidirectional sees the whole sequence
        packed = pack_batch(ids, mask)
        with torch.no_grad():
            expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
            ours = packed.pad(model.model(**packed.model_inputs()).last_hidden_state)
            padded = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        _assert_close(ours[real], expected[real])
        _assert_close(padded[real], expected[real])
    unwindowed, _ = _models(family, True, sliding_window=None)
    with torch.no_grad():
        full = unwindowed.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (full[real] - padded[real]).abs().max() > 0  # the window changes a causal result


@pytest.mark.parametrize(("family", "reach"), [("gemma2", 4), ("gemma3", 4), ("embeddinggemma", 3)])
def test_bidirectional_sliding_window_is_transformers_window(family: str, reach: int) -> None:
    """One sliding layer: token 8 moves exactly the positions transformers' window lets see it.

    Made bidirectional, Gemma 2/3 see ``|i - j| <= w`` (w = 4); EmbeddingGemma's own window is ``|i - j| < w``.
    """
    overrides = dict(num_hidden_layers=1, layer_types=["sliding_attention"])
    model, reference = _models(family, **overrides)
    ids, mask = _batch(384, [9, 6], left=False)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 384
    packed, packed_changed = pack_batch(ids, mask), pack_batch(changed, mask)
    with torch.no_grad():
        base = packed.pad(model.model(**packed.model_inputs()).last_hidden_state)
        after = packed.pad(model.model(**packed_changed.model_inputs()).last_hidden_state)
        expected = reference.model(input_ids=changed, attention_mask=mask).last_hidden_state
    moved = (after[0] - base[0]).abs().amax(dim=-1) > 0
    assert moved.tolist() == [position >= 8 - reach for position in range(9)]
    _assert_close(after[mask.bool()], expected[mask.bool()])


@pytest.mark.parametrize("family", ["gemma2", "embeddinggemma"])
def test_bidirectional_windows_on_the_triton_kernels(family: str, kernel_device: torch.device) -> None:
    model, reference = _models(family)
    enable_bidirectional(model.to(kernel_device), backend="triton")
    ids, mask = _batch(384, [9, 6], left=True)
    real = mask.bool()
    packed = pack_batch(ids.to(kernel_device), mask.to(kernel_device))
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = model.model(input_ids=ids.to(kernel_device), attention_mask=mask.to(kernel_device)).last_hidden_state
        unpadded = packed.pad(model.model(**packed.model_inputs()).last_hidden_state)
    _assert_close(padded.cpu()[real], expected[real])
    _assert_close(unpadded.cpu()[real], expected[real])


def test_embeddinggemma_loaded_on_our_attention_is_bidirectional_as_trained(tmp_path) -> None:
    """No enable_bidirectional: the config's use_bidirectional_attention alone makes our attention bidirectional."""
    from transformers import AutoModel

    model, _ = build_tiny_model("embeddinggemma")
    model.model.save_pretrained(tmp_path)
    register()
    ours = AutoModel.from_pretrained(tmp_path, attn_implementation=ATTENTION_NAME)
    reference = AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert ours.config.sliding_window == 4  # the saved window of 6 reloads halved, as transformers defines it
    assert is_bidirectional(ours)
    ids, mask = _batch(384, [9, 4, 7], left=True)
    real = mask.bool()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = pack_batch(ids, mask)
        unpadded = packed.pad(ours(**packed.model_inputs()).last_hidden_state)
    _assert_close(padded[real], expected[real])
    _assert_close(unpadded[real], expected[real])


def test_gemma2_softcap_reaches_the_kernel() -> None:
    ids, mask = _batch(384, [8, 5], left=True)
    real = mask.bool()
    model, reference = _models("gemma2", attn_logit_softcapping=0.05)
    packed = pack_batch(ids, mask)
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = packed.pad(model.model(**packed.model_inputs()).last_hidden_state)
    _assert_close(ours[real], expected[real])
    uncapped, _ = _models("gemma2", attn_logit_softcapping=None)
    with torch.no_grad():
        plain = uncapped.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (plain[real] - ours[real]).abs().max() > 1e-3


@pytest.mark.parametrize("family", MODELS)
def test_lora_gradients_match_eager(family: str) -> None:
    from peft import LoraConfig, get_peft_model

    model, reference = _models(family)
    targets = ["q_proj", "v_proj", "qkv_proj", "down_proj"]  # Phi-3 fuses q, k, v into qkv_proj
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ours = get_peft_model(model.model, copy.deepcopy(lora))
    theirs = get_peft_model(reference.model, copy.deepcopy(lora))
    theirs.load_state_dict(ours.state_dict())
    enable_bidirectional(ours)  # on the PeftModel wrapper: still routes attention
    ids, mask = _batch(384, [7, 4, 6], left=False)
    real = mask.bool()
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    packed = pack_batch(ids, mask)

    def grads(net, inputs, pad):
        net.zero_grad()
        hidden = pad(net(**inputs).last_hidden_state)
        (hidden * weights)[real].sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    expected = grads(theirs, {"input_ids": ids, "attention_mask": mask}, lambda h: h)
    for inputs, pad in (({"input_ids": ids, "attention_mask": mask}, lambda h: h), (packed.model_inputs(), packed.pad)):
        actual = grads(ours, inputs, pad)
        assert actual.keys() == expected.keys() and len(actual) > 0
        for name in expected:
            _assert_close(actual[name], expected[name], 1e-4)


def test_registration_and_from_pretrained_option(tmp_path) -> None:
    from transformers import AttentionInterface, AutoModel
    from transformers.masking_utils import AttentionMaskInterface

    register()
    register()
    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert ATTENTION_NAME in AttentionMaskInterface._global_mapping
    model, tokenizer = build_tiny_model("qwen2")
    model.model.save_pretrained(tmp_path)
    ids, mask = _batch(model.config.vocab_size, [5, 3], left=True)
    real = mask.bool()
    reference = copy.deepcopy(model.model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        causal = AutoModel.from_pretrained(tmp_path, attn_implementation=ATTENTION_NAME)
        _assert_close(
            causal(input_ids=ids, attention_mask=mask).last_hidden_state[real],
            reference(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        )
        bidirectional = load_bidirectional(str(tmp_path), backend="reference")
        reference.config.is_causal = False
        _assert_close(
            bidirectional(input_ids=ids, attention_mask=mask).last_hidden_state[real],
            reference(input_ids=ids, attention_mask=mask).last_hidden_state[real],
        )
    assert is_bidirectional(bidirectional)
    with pytest.raises(ValueError, match="attn_implementation"):
        load_bidirectional(str(tmp_path), attn_implementation="sdpa")


def test_clear_errors() -> None:
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="gpt2.*not supported.*llama"):
        enable_bidirectional(gpt2)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_bidirectional(torch.nn.Linear(2, 2))
    model, _ = build_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown attention backend"):
        enable_bidirectional(model, backend="magic")
    enable_bidirectional(model)
    ids, mask = _batch(384, [4, 2], left=False)
    with pytest.raises(ValueError, match="4-D mask|2-D key-padding"):
        model.model(input_ids=ids, attention_mask=torch.zeros(2, 1, 4, 4))
    dropping, _ = build_tiny_model("llama", attention_dropout=0.1)
    enable_bidirectional(dropping).train()
    with pytest.raises(ValueError, match="dropout"):
        dropping.model(input_ids=ids, attention_mask=mask)
