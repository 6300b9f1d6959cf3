"""Shared by the benchmark scripts: what machine and versions a result came from, and writing it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
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
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = driver_version()
    return info


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (torch does not expose it)."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


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


def read_phases(path: Path) -> list[dict]:
    """gpu_session.sh's phases.tsv: name, exit status, seconds taken, seconds allowed (one phase a line)."""
    phases = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, budget = line.split("\t")
        phases.append(dict(phase=name, exit=int(status), seconds=int(seconds), budget=int(budget)))
    return phases


def session_summary(work: Path, env: dict) -> dict:
    """One session's results from the files its phases left in `work`: phases.tsv, smoke_*.json,
    static_report.json (kernel_report.py --json) and attention_*.json (bench_attention.py)."""
    smoke = [row for path in sorted(work.glob("smoke_*.json")) for row in json.loads(path.read_text())]
    static = json.loads((work / "static_report.json").read_text()) if (work / "static_report.json").exists() else {}
    tables = {
        path.stem.removeprefix("attention_"): json.loads(path.read_text())["results"]
        for path in sorted(work.glob("attention_*.json"))
    }
    return dict(environment=env, phases=read_phases(work / "phases.tsv"), smoke=smoke, static=static, tables=tables)


def session_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = ["# GPU session " + env.get("date", ""), ""]
    lines += [", ".join(f"{key} {value}" for key, value in env.items() if value is not None and key != "date"), ""]
    phases = summary["phases"]
    lines += [markdown_table(phases, ["phase", "exit", "seconds", "budget"]), ""]
    lines += [f"total {sum(phase['seconds'] for phase in phases)} s", ""]
    smoke = summary["smoke"]
    failed = [row for row in smoke if row["status"] != "ok"]
    lines += [f"## GPU smoke: {len(smoke) - len(failed)} of {len(smoke)} cases pass", ""]
    if failed:
        lines += [markdown_table(failed, ["case", "status", "errors"]), ""]
    columns = ["backend", "mode", "seqlen", "batch", "ms", "tflops", "vs_best_peer", "rel_error", "static", "status"]
    for table, rows in summary["tables"].items():
        lines += [f"## {table}", "", markdown_table(rows, columns), ""]
    static = summary["static"]
    if static:
        lines += [f"## Static report ({static.get('versions')}, {len(static.get('rows', []))} rows)", ""]
        lines += [f"- {problem}" for problem in static.get("problems", [])] or ["- --check: no problem"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``reporting.py session WORK OUT``: write OUT/session.json and OUT/session.md from WORK's files."""
    if len(argv) != 3 or argv[0] != "session":
        print("usage: python benchmarks/reporting.py session WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    work, out = Path(argv[1]), Path(argv[2])
    summary = session_summary(work, environment())
    out.mkdir(parents=True, exist_ok=True)
    (out / "session.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "session.md").write_text(session_markdown(summary))
    print(session_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
