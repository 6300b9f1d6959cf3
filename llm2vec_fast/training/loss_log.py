"""The loss curve of a run: one row per optimizer step in ``loss_log.csv`` and ``loss_log.jsonl``, and ``loss.png``.

Rows are flushed as they are written, so the files are current even if a run dies; a resumed
run first drops rows after its checkpoint (and a last row cut short by a crash), rewriting both
files atomically, so the log never shows a step twice.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

from .atomic import write_atomically, write_text_atomically

FIELDS = ("step", "loss", "grad_norm", "learning_rate", "loss_terms", "tokens", "seconds")
CSV_FILE, JSONL_FILE = "loss_log.csv", "loss_log.jsonl"
LOG_FILES = (CSV_FILE, JSONL_FILE)


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of a ``loss_log.jsonl`` file, less a last row cut short (no newline after it: the writer died mid-row).

    Any other line that is not a JSON row is a ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a loss log row ({error.msg})") from None
    return rows


def _csv_line(values: list) -> str:
    text = io.StringIO()
    csv.writer(text).writerow(values)
    return text.getvalue()


class LossLog:
    """Appends per-step rows to ``<directory>/loss_log.{csv,jsonl}``."""

    def __init__(self, directory: Path, resume_after_step: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = self.directory / CSV_FILE, self.directory / JSONL_FILE
        kept = [
            r for r in read_log(self.jsonl_path) if resume_after_step is not None and r["step"] <= resume_after_step
        ]
        self.rows: list[dict[str, float]] = [{key: row[key] for key in FIELDS} for row in kept]
        csv_lines = [_csv_line(list(FIELDS)), *(_csv_line(self._values(row)) for row in self.rows)]
        write_text_atomically(self.csv_path, "".join(csv_lines))
        write_text_atomically(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in self.rows))

    @staticmethod
    def _values(row: dict[str, float]) -> list[float]:
        return [row[key] for key in FIELDS]

    def append(self, row: dict[str, float]) -> None:
        row = {key: row[key] for key in FIELDS}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as handle:
            handle.write(_csv_line(self._values(row)))
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def plot(self, title: str) -> Path | None:
        """Draw ``loss.png`` (raw loss and a moving average); None, with a warning, without matplotlib."""
        return plot_losses(self.rows, self.directory / "loss.png", title)


def plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plot (pip install matplotlib)", stacklevel=2)
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 50)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(steps, losses, alpha=0.35, label="loss")
    if window > 1:
        axis.plot(steps, smooth, label=f"moving average ({window} steps)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return path
