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

from ..atomic_files import write_atomically, write_text_atomically

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
        """Draw ``loss.png`` (loss raw and smoothed, learning rate, gradient norm); None, with a warning, without
        matplotlib."""
        return plot_losses(self.rows, self.directory / "loss.png", title)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to ``window - 1`` values before it."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def smoothing_window(steps: int) -> int:
    """About a twentieth of the run, at least one step: smooth enough to show the trend, short enough to follow it."""
    return max(1, steps // 20)


def plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> Path | None:
    """Three panels sharing the step axis: loss (raw, faint, and its moving average), learning rate, gradient norm
    (log scale when it spans more than a factor 100); `title` names the run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plot (pip install matplotlib)", stacklevel=2)
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = smoothing_window(len(losses))
    figure, (loss_axis, lr_axis, norm_axis) = plt.subplots(
        3, 1, figsize=(8, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=1, label="loss")
    if window > 1:
        loss_axis.plot(
            steps, moving_average(losses, window), color="tab:blue", label=f"moving average ({window} steps)"
        )
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper right")
    lr_axis.plot(steps, [r["learning_rate"] for r in rows], color="tab:green")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    norms = [r["grad_norm"] for r in rows]
    norm_axis.plot(steps, norms, color="tab:red", linewidth=1)
    finite = [n for n in norms if n > 0 and n != float("inf")]
    if finite and max(finite) > 100 * min(finite):
        norm_axis.set_yscale("log")
    norm_axis.set_ylabel("grad norm")
    norm_axis.set_xlabel("optimizer step")
    for axis in (loss_axis, lr_axis, norm_axis):
        axis.grid(alpha=0.3)
    if rows:
        last = rows[-1]
        title += f"\nstep {last['step']}, loss {last['loss']:.4f}, {sum(r['tokens'] for r in rows):,} tokens"
    figure.suptitle(title)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return path
