"""Shared by the benchmark scripts: what machine and versions a result came from, and writing it."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device name and the library versions that shape the numbers."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in ("triton", "transformers", "peft", "flash_attn"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def require_gpu(script: str) -> bool:
    """True when a CUDA device is present; otherwise say that nothing was measured."""
    if torch.cuda.is_available():
        return True
    print(f"{script}: needs a CUDA GPU and none is visible; nothing was measured.")
    return False


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, env: dict, rows: list[dict], markdown: str, directory: Path | None = None) -> Path:
    """Write ``<name>.json`` (environment + rows) and ``<name>.md`` (environment + table) to results/."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / name
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    header = ", ".join(f"{key} {value}" for key, value in env.items() if value is not None)
    stem.with_suffix(".md").write_text(f"# {name}\n\n{header}\n\n{markdown}\n")
    return stem
