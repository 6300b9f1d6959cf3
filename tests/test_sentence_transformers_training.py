"""sentence-transformers training through LLM2VecModule: gradients in the module's mode, only the LoRA trains,
SentenceTransformerTrainer lowers a contrastive loss, and the saved model and adapter reload to the same vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from llm2vec_fast import LLM2Vec
from llm2vec_fast.sentence_transformers import to_sentence_transformer
from llm2vec_fast.tiny import save_tiny_model

QUERY = "Given a question, retrieve the answer:"
TOPICS = ["rain", "guitar", "protein", "paris", "attention", "football", "ovens", "stocks"]
QUESTIONS = [f"what about {topic} today" for topic in TOPICS] + [f"tell me of {topic}" for topic in TOPICS]
ANSWERS = [f"{topic} is the answer" for topic in TOPICS] + [f"all on {topic} here" for topic in TOPICS]
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=7)


def _with_lora(model_dir: Path, **lora: object) -> LLM2Vec:
    """The converted tiny model with a fresh LoRA on q/v (peft's own way: base frozen, adapter trainable)."""
    encoder = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="mean")
    encoder.model = get_peft_model(
        encoder.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)
    )
    return encoder


def _encode(encoder: LLM2Vec, texts: list[str]) -> torch.Tensor:
    return encoder.encode([[QUERY, text] for text in texts], show_progress_bar=False)


def test_forward_has_gradients_and_follows_the_modules_mode(model_dir: Path) -> None:
    encoder = _with_lora(model_dir, lora_dropout=0.3, init_lora_weights=False)  # dropout that changes outputs
    model = to_sentence_transformer(encoder)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    features = model[0].preprocess(QUESTIONS[:4], prompt=QUERY)

    model.train()
    torch.manual_seed(0)
    first = model(dict(features))["sentence_embedding"]
    torch.manual_seed(1)
    second = model(dict(features))["sentence_embedding"]
    assert first.requires_grad and (first - second).abs().max() > 1e-4  # train mode: dropout on
    first.square().sum().backward()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name

    model.eval()
    evaluated = model(dict(features))["sentence_embedding"]
    assert torch.equal(evaluated, model(dict(features))["sentence_embedding"])  # eval mode: no dropout
    torch.testing.assert_close(evaluated.detach(), _encode(encoder, QUESTIONS[:4]), **CLOSE)  # prompt = instruction


def test_trainer_trains_the_lora_and_the_saved_model_reloads(model_dir: Path, tmp_path: Path) -> None:
    encoder = _with_lora(model_dir)
    model = to_sentence_transformer(encoder, prompts={"query": QUERY})
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        prompts={"anchor": QUERY},
    )
    dataset = Dataset.from_dict({"anchor": QUESTIONS, "positive": ANSWERS})
    trainer = SentenceTransformerTrainer(
        model=model, args=arguments, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    )
    trainer.train()

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name  # the base is untouched
        elif "lora_B" in name:
            assert parameter.abs().sum() > 0, name  # initialised to zero, trained away from it

    trained = model.encode(QUESTIONS, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(trained, _encode(encoder, QUESTIONS), **CLOSE)
    model.save(str(tmp_path / "st"))
    assert sorted(p.name for p in (tmp_path / "st").glob("adapter_*")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    assert reloaded.prompts["query"] == QUERY
    again = reloaded.encode(QUESTIONS, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(again, trained, **CLOSE)
    adapter = LLM2Vec.from_pretrained(str(model_dir), peft_model_name_or_path=str(tmp_path / "st"))
    torch.testing.assert_close(_encode(adapter, QUESTIONS), trained, **CLOSE)


def test_older_sentence_transformers_are_refused_in_one_line() -> None:
    """Before 5.4 the prompt is prepended to the texts (and would be pooled as text): no silent wrong vectors."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sentence_transformers.base.modules'] = None  # as on 5.3, which lacks it\n"
        "import llm2vec_fast.sentence_transformers"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: llm2vec_fast.sentence_transformers needs sentence-transformers>=5.4: "
        "pip install 'llm2vec-fast[sentence-transformers]'"
    )
