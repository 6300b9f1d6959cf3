"""Each objective on a tiny model: loss vs a straightforward Hugging Face reference, kernel-vs-eager
convergence parity, exact resume, and the errors of bad runs."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_files import write_training_files
from transformers import AutoModel, AutoModelForCausalLM

from llm2vec_fast.training import load_config, train
from llm2vec_fast.training.data.masking import add_mask_token, masking_rule
from llm2vec_fast.training.data.records import TextLines, contrastive_files
from llm2vec_fast.training.data.sources import MNTPSource, SupervisedSource
from llm2vec_fast.training.modeling import build_embedder, build_mntp_model, decoder_spec, load_tokenizer
from llm2vec_fast.training.objectives import contrastive_batch_loss

EXACT = dict(lora_dropout=0.0, torch_dtype="float32", disable_tqdm=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_training_files(
        tmp_path_factory.mktemp("train"),
        "llama",
        seed=1,
        text_lines=80,
        sentences_per_line=3,
        datasets={"fever": 24, "nq": 24},
    )


def _config(objective, files, tmp_path, **settings):
    data = {"mntp": files / "text.txt", "simcse": files / "text.txt", "supervised": files / "sup"}[objective]
    base = dict(
        model_name_or_path=str(files / "model"),
        train_files=[str(data)],
        output_dir=str(tmp_path / "out"),
        max_seq_length=48,
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=100,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        **EXACT,
    )
    if objective == "supervised":
        base.update(
            warmup_steps=0, instructions={"fever": "Given a claim, retrieve documents", "nq": "Answer the question"}
        )
    if objective == "simcse":
        base.update(simcse_dropout=0.0)
    return load_config(objective, None, {**base, **settings})


def _perturb_lora(model):
    """LoRA starts as a no-op (B = 0); give it weight so the references see it."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _merged_reference(peft_model, path, model_class):
    """A plain HF model in eager attention, made bidirectional, holding `peft_model`'s merged weights."""
    merged = copy.deepcopy(peft_model).merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    reference = model_class.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    inner = reference.model if model_class is AutoModelForCausalLM else reference
    inner.load_state_dict(merged.state_dict())
    reference.config.is_causal = False
    for module in reference.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return reference


def _right_padded(sequences, pad=0):
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def test_reference_attention_is_bidirectional(files):
    model = _merged_reference(AutoModel.from_pretrained(files / "model"), files / "model", AutoModel).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    changed = ids.clone()
    changed[0, -1] = 44
    with torch.no_grad():
        first = model(input_ids=ids).last_hidden_state[0, 0]
        second = model(input_ids=changed).last_hidden_state[0, 0]
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("layout", ["lines", "concat"])
def test_mntp_loss_equals_hf_causal_lm_loss_with_masked_labels(files, tmp_path, layout):
    config = _config("mntp", files, tmp_path, data_layout=layout, mlm_probability=0.3)
    tokenizer = load_tokenizer(config.model_name_or_path)
    add_mask_token(tokenizer, "blank")
    source = MNTPSource(
        TextLines(config.train_files),
        tokenizer,
        masking_rule(tokenizer, 0.3, "default"),
        layout=layout,
        max_seq_length=48,
        batch_size=5,
        max_tokens_per_batch=None,
        seed=0,
    )
    model = build_mntp_model(
        decoder_spec(config, torch.device("cpu")),
        tokenizer,
        vocabulary_grew=False,
        train_lm_head=False,
        chunk_size=config.loss_chunk_size,
    )
    _perturb_lora(model)
    batch = source.next_batch()
    ours = model(batch) / batch.num_loss_terms
    reference = _merged_reference(model.decoder, files / "model", AutoModelForCausalLM)
    input_ids, attention_mask = _right_padded(batch.sequences)
    labels = torch.full_like(input_ids, -100)
    labels[torch.from_numpy(batch.target_rows), torch.from_numpy(batch.target_cols)] = torch.from_numpy(
        batch.target_ids
    )
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert batch.num_loss_terms > 10
    assert abs(float(ours.detach()) - float(expected.detach())) / float(expected.detach()) < 1e-5


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos_token"])
def test_supervised_loss_equals_official_formula_on_hf_embeddings(files, tmp_path, pooling_mode):
    config = _config("supervised", files, tmp_path, pooling_mode=pooling_mode)
    tokenizer = load_tokenizer(config.model_name_or_path)
    source = SupervisedSource(
        contrastive_files(config.train_files, config.instructions, True),
        tokenizer,
        max_seq_length=48,
        batch_size=4,
        append_eos=pooling_mode == "eos_token",
        template=None,
        seed=0,
    )
    model = build_embedder(
        decoder_spec(config, torch.device("cpu")),
        tokenizer,
        pooling_mode=pooling_mode,
        skip_instruction=config.skip_instruction,
    )
    _perturb_lora(model)
    batch = source.next_batch()
    ours = contrastive_batch_loss(model, batch, scale=50.0) / batch.num_queries
    reference = _merged_reference(model.decoder, files / "model", AutoModel).double()
    input_ids, attention_mask = _right_padded(batch.sequences)
    hidden = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    pooled = []
    for row, (seq, lead) in enumerate(zip(batch.sequences, batch.instruction_lengths)):
        tokens = hidden[row, lead : len(seq)]
        if pooling_mode == "mean":
            pooled.append(tokens.mean(0))
        elif pooling_mode == "weighted_mean":
            weights = torch.arange(1, len(tokens) + 1, dtype=torch.float64)
            pooled.append((tokens * weights[:, None]).sum(0) / weights.sum())
        else:
            pooled.append(hidden[row, len(seq) - 1])
    pooled = torch.stack(pooled)
    q, documents = pooled[:4], pooled[4:]
    scores = 50.0 * F.normalize(q, dim=1) @ F.normalize(documents, dim=1).t()
    expected = F.cross_entropy(scores, torch.arange(4))
    assert (
        len(batch.sequences) == 12 and min(batch.instruction_lengths[:4]) > 1
    )  # BOS + instruction skipped for queries
    assert abs(float(ours.detach()) - float(expected.detach())) / float(expected.detach()) < 1e-5


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_loss_curves_match_hf_eager_attention(files, tmp_path, objective):
    ours = train(_config(objective, files, tmp_path / "ours"))
    eager = train(_config(objective, files, tmp_path / "eager", attn_implementation="eager"))
    assert len(ours.losses) == 4 and all(np.isfinite(ours.losses))
    assert np.allclose(ours.losses, eager.losses, rtol=2e-4, atol=0), (ours.losses, eager.losses)


@pytest.mark.parametrize(
    "objective, settings",
    [
        ("mntp", dict(data_layout="concat", lora_dropout=0.1, gradient_accumulation_steps=2)),
        ("simcse", dict(simcse_dropout=0.3, lora_dropout=0.05, gradient_checkpointing=True)),
        ("supervised", dict(lr_scheduler="linear", warmup_steps=2)),
    ],
)
def test_resume_continues_with_identical_losses(files, tmp_path, objective, settings):
    straight = train(_config(objective, files, tmp_path / "straight", max_steps=6, save_steps=3, **settings))
    first = train(
        _config(objective, files, tmp_path / "split", max_steps=6, stop_after_steps=3, save_steps=100, **settings)
    )
    resumed = train(
        _config(
            objective, files, tmp_path / "split", max_steps=6, save_steps=3, resume_from_checkpoint="latest", **settings
        )
    )
    assert first.losses + resumed.losses == straight.losses
    log = [json.loads(line) for line in (tmp_path / "split" / "out" / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 7)) and [row["loss"] for row in log] == straight.losses
    assert (tmp_path / "split" / "out" / "loss.png").stat().st_size > 1000


def test_bad_runs_fail_with_messages(files, tmp_path):
    train(_config("simcse", files, tmp_path, max_steps=2, save_steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_config("simcse", files, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"settings differ.*learning_rate: 0.001 -> 0.01"):
        train(_config("simcse", files, tmp_path, max_steps=4, learning_rate=1e-2, resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match="nothing left to train before step 2"):
        train(_config("simcse", files, tmp_path, max_steps=2, resume_from_checkpoint="latest"))
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        train(_config("simcse", files, tmp_path / "other", resume_from_checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="match no module"):
        train(_config("simcse", files, tmp_path / "lora", lora_target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="no data set holds a full global batch of 64"):
        train(_config("supervised", files, tmp_path / "big", per_device_train_batch_size=64))


@pytest.mark.gpu
@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_bfloat16_cuda_training_tracks_hf_sdpa(files, tmp_path, objective):
    settings = dict(device="cuda", torch_dtype="bfloat16", gradient_checkpointing=True)
    ours = train(_config(objective, files, tmp_path / "ours", **settings))
    sdpa = train(_config(objective, files, tmp_path / "sdpa", attn_implementation="sdpa", **settings))
    assert all(np.isfinite(ours.losses))
    assert np.allclose(ours.losses, sdpa.losses, rtol=3e-2, atol=1e-3), (ours.losses, sdpa.losses)


def test_default_lora_targets_reach_fused_projections():
    """Phi-3 fuses q/k/v and gate/up: the default targets train the fused modules instead of failing."""
    from llm2vec_fast.tiny import build_tiny_model
    from llm2vec_fast.training.config import LORA_TARGETS
    from llm2vec_fast.training.modeling import add_lora, lora_targets

    decoder = build_tiny_model("phi3")[0].model
    assert sorted(lora_targets(decoder, LORA_TARGETS)) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    llama = build_tiny_model("llama")[0].model
    assert lora_targets(llama, LORA_TARGETS) == sorted(LORA_TARGETS)  # separate projections stay as named
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module of LlamaModel"):
        lora_targets(llama, ["qkv_proj"])
    from peft import LoraConfig

    adapter = add_lora(decoder, LoraConfig(r=2, target_modules=list(LORA_TARGETS)), gradient_checkpointing=False)
    trained = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in adapter.named_parameters() if p.requires_grad}
    assert trained == {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"}
