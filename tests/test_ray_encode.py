"""The Ray Data recipe (``ds.map_batches(RayEncoder, ...)``) on a local Ray cluster on this CPU.

Ray is an optional extra: the suite skips this without it, and CI's last job installs Ray and runs it with
LLM2VEC_FAST_REQUIRE_RAY=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.ray_encode import RayEncoder

ray = __import__("ray") if os.environ.get("LLM2VEC_FAST_REQUIRE_RAY") == "1" else pytest.importorskip("ray")

MODEL = Path(__file__).parent / "data" / "llm2vec_oracle" / "mistral"
TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(20)]


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_map_batches_with_one_encoder_per_actor_equals_llm2vec_encode(local_cluster) -> None:
    instructions = ["Retrieve:" if i % 3 == 0 else "" for i in range(len(TEXTS))]
    rows = [{"id": i, "text": t, "instruction": s} for i, (t, s) in enumerate(zip(TEXTS, instructions))]
    embedded = ray.data.from_items(rows).map_batches(
        RayEncoder,
        fn_constructor_kwargs={
            "model": str(MODEL),
            "instruction_column": "instruction",
            "instruction": "Represent:",
            "batch_size": 4,
            "pooling_mode": "weighted_mean",
        },
        concurrency=1,
        num_cpus=1,
        batch_size=8,
    )
    result = sorted(embedded.take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in result] == list(range(len(TEXTS)))
    assert [row["text"] for row in result] == TEXTS  # other columns pass through
    embeddings = np.stack([row["embedding"] for row in result])
    inputs = [[s or "Represent:", t] for t, s in zip(TEXTS, instructions)]
    expected = LLM2Vec.from_pretrained(str(MODEL), pooling_mode="weighted_mean").encode(
        inputs, show_progress_bar=False, convert_to_numpy=True
    )
    assert embeddings.shape == (len(TEXTS), 64) and embeddings.dtype == np.float32
    assert np.linalg.norm(embeddings - expected) <= 1e-6 * np.linalg.norm(expected)  # fp32 rounding (other batches)


def test_the_encoder_is_a_plain_class_usable_without_a_cluster() -> None:
    encoder = RayEncoder(str(MODEL), device="cpu")
    batch = {"text": np.array(["one", "two"]), "id": np.array([7, 8])}
    out = encoder(batch)
    assert out["id"].tolist() == [7, 8] and out["embedding"].shape == (2, 64)
    expected = LLM2Vec.from_pretrained(str(MODEL)).encode(
        ["one", "two"], show_progress_bar=False, convert_to_numpy=True
    )
    np.testing.assert_allclose(out["embedding"], expected, rtol=1e-5, atol=1e-6)
