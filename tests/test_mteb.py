"""MTEB 2.x: mteb.evaluate runs our encoder on in-memory tasks, with mteb's LLM2Vec instructions, offline."""

from __future__ import annotations

import socket
from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from mteb.mocks.mock_tasks import MockRetrievalTask, MockSTSTask
from mteb.models.models_protocols import EncoderProtocol
from scipy.stats import spearmanr

from llm2vec_fast import LLM2Vec
from llm2vec_fast.mteb import LLM2VecMTEB, get_model
from llm2vec_fast.tiny import save_tiny_model

QUERY_PROMPT = "Given a question, retrieve the passage that answers it"
STS_PROMPT = "Retrieve semantically similar text."
STS_PAIRS = [
    ("A man is playing a guitar.", "A person plays an instrument.", 4.0),
    ("The cat sleeps on the mat.", "Stock prices fell sharply today.", 0.2),
    ("Flash attention is exact.", "Attention computed exactly and fast.", 3.5),
    ("It is raining in Paris.", "Paris has rain today.", 4.5),
    ("Kids play football.", "The oven is hot.", 0.5),
    ("Padding wastes compute.", "Padded tokens cost time.", 3.0),
]


class RetrievalWithQueryPrompt(MockRetrievalTask):
    """mteb's mock retrieval data (2 queries, 2 documents) with a query prompt, as real retrieval tasks have."""

    metadata = MockRetrievalTask.metadata.model_copy(
        update={"name": "LLM2VecFastRetrieval", "prompt": {"query": QUERY_PROMPT}, "eval_splits": ["test"]}
    )


class LocalSTS(MockSTSTask):
    """An STS task from local pairs with one prompt for all its inputs (mteb < 2.26 cannot look up the default
    prompt of a task outside its registry)."""

    metadata = MockSTSTask.metadata.model_copy(update={"name": "LLM2VecFastSTS", "prompt": STS_PROMPT})
    min_score, max_score = 0, 5

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        first, second, scores = map(list, zip(*STS_PAIRS))
        pairs = Dataset.from_dict({"sentence1": first, "sentence2": second, "score": scores})
        self.dataset = DatasetDict({"test": pairs})
        self.data_loaded = True


class RecordingModel(LLM2VecMTEB):
    """Keeps what mteb asked to encode and what it got back."""

    calls: list

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        embeddings = super().encode(
            [{"text": texts}],
            task_metadata=task_metadata,
            hf_split=hf_split,
            hf_subset=hf_subset,
            prompt_type=prompt_type,
            **kwargs,
        )
        self.calls.append((task_metadata.name, prompt_type, texts, embeddings))
        return embeddings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)


@pytest.fixture
def offline(monkeypatch) -> None:
    """Any connection attempt fails the test: mteb must not fetch data sets or model metadata."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _recording(model_dir: Path, **kwargs) -> RecordingModel:
    loaded = get_model(str(model_dir), pooling_mode="mean", **kwargs)
    model = RecordingModel(loaded.model, name="test/tiny-llama", instructions=loaded.prompts_dict)
    model.calls = []
    return model


def test_evaluate_encodes_like_llm2vec_with_mteb_instructions(model_dir: Path, offline: None) -> None:
    model = _recording(model_dir)
    assert isinstance(model, EncoderProtocol)
    results = mteb.evaluate(
        model,
        [RetrievalWithQueryPrompt(), LocalSTS()],
        cache=None,
        show_progress_bar=False,
        encode_kwargs={"batch_size": 4},
    )
    encoder = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="mean")
    sts_instruction = "Retrieve semantically similar text:"  # ended with ":" as mteb's LLM2Vec wrapper does
    expected_inputs = {
        ("LLM2VecFastRetrieval", "query"): lambda text: [f"{QUERY_PROMPT}:", text],
        ("LLM2VecFastRetrieval", "document"): lambda text: text,
        ("LLM2VecFastSTS", None): lambda text: [sts_instruction, text],
    }
    seen = set()
    for task_name, prompt_type, texts, embeddings in model.calls:
        key = (task_name, prompt_type.value if prompt_type else None)
        seen.add(key)
        inputs = [expected_inputs[key](text) for text in texts]
        assert isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float32
        np.testing.assert_allclose(
            embeddings, encoder.encode(inputs, batch_size=4, show_progress_bar=False).numpy(), rtol=1e-5, atol=1e-6
        )
    assert seen == set(expected_inputs)

    scores = {result.task_name: result.get_score() for result in results.task_results}
    first, second, gold = map(list, zip(*STS_PAIRS))
    left = encoder.encode([[sts_instruction, text] for text in first], show_progress_bar=False)
    right = encoder.encode([[sts_instruction, text] for text in second], show_progress_bar=False)
    cosine = torch.nn.functional.cosine_similarity(left, right).numpy()
    assert scores["LLM2VecFastSTS"] == pytest.approx(spearmanr(cosine, gold).statistic, abs=1e-6)
    assert 0.0 <= scores["LLM2VecFastRetrieval"] <= 1.0


def test_instructions_override_the_tasks_prompts(model_dir: Path, offline: None) -> None:
    model = _recording(model_dir, instructions={"STS": "Find a paraphrase"})
    mteb.evaluate(model, LocalSTS(), cache=None, show_progress_bar=False)
    encoder = model.model
    for _, _, texts, embeddings in model.calls:
        expected = encoder.encode([["Find a paraphrase:", text] for text in texts], show_progress_bar=False)
        np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert len(model.calls) == 2


def test_model_meta_similarity_and_reload(model_dir: Path) -> None:
    model = get_model(str(model_dir), pooling_mode="mean", max_length=128, dtype=torch.float32)
    meta = model.mteb_model_meta
    assert (meta.name, meta.embed_dim, meta.max_tokens, meta.use_instructions) == (str(model_dir), 64, 128, True)
    assert meta.n_parameters == sum(p.numel() for p in model.model.parameters())
    assert meta.to_dict()["loader_kwargs"]["dtype"] == "float32"  # JSON-friendly: mteb saves it with the results
    a, b = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(torch.as_tensor(model.similarity(a, b), dtype=torch.float64), expected)
    torch.testing.assert_close(torch.as_tensor(model.similarity_pairwise(a, b), dtype=torch.float64), expected.diag())

    reloaded = meta.load_model()  # through ModelMeta.loader, as mteb loads registered models
    assert isinstance(reloaded, LLM2VecMTEB) and reloaded.model.max_length == 128
    texts = [{"text": ["one text", "another one"]}]
    task = LocalSTS().metadata
    torch.testing.assert_close(
        reloaded.encode(texts, task_metadata=task, hf_split="test", hf_subset="default"),
        model.encode(texts, task_metadata=task, hf_split="test", hf_subset="default"),
    )
    assert LLM2VecMTEB(model.model).mteb_model_meta.name == str(model_dir)  # named after the model's path
    assert LLM2VecMTEB(model.model, name="local").mteb_model_meta.name == "llm2vec-fast/local"


def test_bad_arguments(model_dir: Path) -> None:
    model = get_model(str(model_dir))
    with pytest.raises(TypeError, match="LLM2VecMTEB wraps an llm2vec_fast.LLM2Vec, got str"):
        LLM2VecMTEB("not an encoder")
    task = LocalSTS().metadata
    with pytest.raises(ValueError, match="precision must be 'float32'"):
        model.encode([{"text": ["a"]}], task_metadata=task, hf_split="test", hf_subset="default", precision="int8")
    with pytest.raises(TypeError, match="unexpected keyword arguments: colour"):
        model.encode([{"text": ["a"]}], task_metadata=task, hf_split="test", hf_subset="default", colour="red")
