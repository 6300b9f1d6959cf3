"""A tiny model and small text / contrastive JSONL files for the training tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llm2vec_fast.tiny import CORPUS, save_tiny_model


def write_training_files(
    root: Path,
    family: str,
    seed: int,
    text_lines: int,
    sentences_per_line: int,
    datasets: dict[str, int],
    negatives: int = 1,
) -> Path:
    """root/model (a tiny `family` model), root/text.txt (lines of 1..sentences_per_line corpus
    sentences) and root/sup/<name>.jsonl (`count` query/positive/negative records per data set)."""
    save_tiny_model(root / "model", family, seed=seed)
    rng = random.Random(seed)
    lines = (" ".join(rng.sample(CORPUS, rng.randrange(1, sentences_per_line + 1))) for _ in range(text_lines))
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    (root / "sup").mkdir()
    for name, count in datasets.items():
        rows = []
        for _ in range(count):
            query, positive, *others = rng.sample(CORPUS, 2 + negatives)
            rows.append(
                {
                    "query": query,
                    "positive": positive,
                    **({"negative": others[0]} if negatives == 1 else {"negatives": others}),
                }
            )
        (root / "sup" / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root
