"""The GPU session's CPU-testable parts: gpu_session.sh's arguments and plan, the smoke's plan, shards and
checks (one case run end to end on the interpreter), the headline benchmark's problems, FLOP counts, peer
comparison and static figures, the session summary's schema, and the autotuning limit. No GPU, no timing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_attention  # noqa: E402
import gpu_smoke  # noqa: E402
import reporting  # noqa: E402

SESSION = ROOT / "benchmarks" / "gpu_session.sh"


def session(*args):
    return subprocess.run(["bash", str(SESSION), *args], capture_output=True, text=True, timeout=60)


def test_session_script_parses():
    assert subprocess.run(["bash", "-n", str(SESSION)]).returncode == 0


def test_quick_dry_run_plans_every_phase_inside_eight_minutes():
    result = session("quick", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    phases = {line.split()[0]: int(line.split()[1]) for line in lines[:-1]}
    assert list(phases) == ["static-report", "build", "smoke", "bench-dense", "bench-padded", "bench-mix"]
    sequential = sum(limit for name, limit in phases.items() if name != "static-report")
    assert sequential <= 440 and sequential + 35 < 480, phases
    assert "TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16" in result.stdout
    assert "at most 440 s of phases" in lines[-1]


@pytest.mark.parametrize("args", [["nope"], ["quick", "--fast"], ["quick", "--dry-run", "more"]])
def test_session_rejects_bad_arguments_with_one_line(args):
    result = session(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "gpu_session.sh:" in result.stderr


def test_smoke_plan_covers_every_layout_and_feature_on_each_backend():
    cases = gpu_smoke.plan(["cuda", "triton"])
    for backend in ("cuda", "triton"):
        mine = [case for case in cases if case.backend == backend]
        assert {case.layout for case in mine} == set(gpu_smoke.LAYOUTS)
        assert {case.dtype for case in mine} >= {"bf16", "fp16"} and {case.head_dim for case in mine} >= {64, 128}
        assert any(case.causal for case in mine) and any(case.softcap for case in mine)
        assert any(case.window != (-1, -1) and case.layout == "packed" for case in mine)
    assert any(case.deterministic for case in cases if case.backend == "cuda")
    assert any(case.dtype == "fp32" for case in cases if case.backend == "triton")
    assert len({case.name for case in cases}) == len(cases)


def test_shards_split_the_plan_into_whole_specialization_groups():
    cases = gpu_smoke.plan(["triton"])
    shards = [gpu_smoke.shard(cases, index, 4) for index in range(4)]
    assert sorted(case.name for part in shards for case in part) == sorted(case.name for case in cases)
    groups = [{case.specialization for case in part} for part in shards]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])


@pytest.mark.parametrize("shard", ["1", "4/4", "a/b"])
def test_smoke_rejects_a_bad_shard(shard, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_smoke.parse_args(["--shard", shard])
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err


def test_relative_error_fails_nan_and_infinities_in_the_wrong_place():
    expected = torch.tensor([1.0, 2.0, float("-inf")])
    assert gpu_smoke.relative_error(expected.clone(), expected) == 0.0
    assert gpu_smoke.relative_error(torch.tensor([1.0, float("nan"), float("-inf")]), expected) == math.inf
    assert gpu_smoke.relative_error(torch.tensor([1.0, 2.0, 0.0]), expected) == math.inf
    assert 0 < gpu_smoke.relative_error(torch.tensor([1.0, 2.1, float("-inf")]), expected) < 0.1


@pytest.mark.parametrize("layout", ["holes", "packed"])
def test_a_smoke_case_runs_end_to_end_on_the_interpreter(layout):
    case = gpu_smoke.Case("triton", dtype="fp32", head_dim=16, layout=layout, batch=2, seqlen=40, heads=(2, 1))
    row = gpu_smoke.run_case(case, device="cpu")
    assert row["status"] == "ok", row
    assert set(row["errors"]) == {"out", "lse", "dq", "dk", "dv"} and max(row["errors"].values()) < 1e-5


def test_a_wrong_kernel_fails_the_smoke(monkeypatch):
    real = gpu_smoke.attention

    def off_by_a_bit(case, tensors, backend, lengths, mask):
        out, lse = real(case, tensors, backend, lengths, mask)
        return out * 1.01, lse

    monkeypatch.setattr(gpu_smoke, "attention", off_by_a_bit)
    case = gpu_smoke.Case("triton", dtype="fp32", head_dim=16, layout="dense", batch=1, seqlen=24, heads=(2, 1))
    assert gpu_smoke.run_case(case, device="cpu")["status"] == "fail"


def test_flops_count_real_tokens_and_backward_as_two_and_a_half_forwards():
    problem = bench_attention.Problem(2, 100, 8, 2, 64, explicit_lengths=(100, 50))
    forward = 4 * (100**2 + 50**2) * 8 * 64
    assert problem.flops("fwd") == forward and problem.flops("fwd+bwd") == 3.5 * forward
    padded = bench_attention.Problem(8, 2048, 32, 8, 128, padding=0.5)
    assert abs(1 - sum(padded.lengths()) / (8 * 2048) - 0.5) < 0.01


def test_headline_problems_are_the_issue_shapes():
    dense = bench_attention.headline_problems("dense")
    assert [(p.batch, p.seqlen, p.layout) for p in dense] == [(8, 2048, "dense"), (2, 8192, "dense")]
    (mix,) = bench_attention.headline_problems("mix")
    lengths = sorted(mix.lengths())
    assert len(lengths) == 64 and max(lengths) <= 512 and mix.seqlen == max(lengths)
    assert 40 <= lengths[32] <= 90 and (mix.heads_q, mix.heads_kv, mix.head_dim) == (32, 8, 128)
    with pytest.raises(ValueError, match="unknown table"):
        bench_attention.headline_problems("sparse")


def test_each_row_is_compared_with_the_fastest_peer_of_its_problem():
    base = dict(layout="dense", seqlen=2048, batch=8, head_dim=128, mode="fwd", status="ok")
    rows = [base | dict(backend="ours-triton", tflops=300.0), base | dict(backend="sdpa-cudnn", tflops=400.0)]
    rows += [base | dict(backend="sdpa-math", tflops=50.0), base | dict(backend="sdpa-flash", status="unsupported")]
    bench_attention.compare_with_peers(rows)
    assert rows[0]["vs_best_peer"] == 0.75 and rows[1]["vs_best_peer"] == 1.0 and "vs_best_peer" not in rows[3]


def test_static_figures_name_the_tiles_the_autotuner_chose():
    static = dict(source="triton", kernel="fwd", arch="sm_90a", input_class="half", variant="packed", block_m=128)
    static |= dict(block_n=64, num_warps=8, num_stages=2, per_block=1596.0, registers=200)
    row = dict(backend="ours-triton varlen", layout="mix", mode="fwd")
    assert bench_attention.static_figures(row, [static], {"fwd": (128, 64, 8, 2)}) == (
        "fwd 128x64w8: 1596 instr/64x64, 200 regs"
    )
    assert bench_attention.static_figures(row, [static], {"fwd": (128, 128, 8, 2)}) == ""
    cuda = dict(source="cuda", file="fwd_sm90_d128_bf16.cu", kernel="fwd_sm90_kernel<HopperFwdConfig<Bf16, 128>>")
    cuda |= dict(arch="sm_90a", block_m=128, block_n=128, num_warps=8, per_block=1262.0, registers=168)
    cuda_row = dict(backend="ours-cuda", layout="dense", mode="fwd+bwd")
    assert bench_attention.static_figures(cuda_row, [cuda], {}) == "fwd 128x128w8: 1262 instr/64x64, 168 regs"


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_attention.parse_args(["--heads", "30", "--kv-heads", "8"])
    assert exit_info.value.code == 2 and "multiple" in capsys.readouterr().err


def test_session_summary_collects_every_phase_file(tmp_path):
    (tmp_path / "phases.tsv").write_text("build\t0\t61\t150\nsmoke\t1\t80\t100\n")
    (tmp_path / "smoke_cuda.json").write_text(json.dumps([dict(case="a", status="ok"), dict(case="b", status="fail")]))
    (tmp_path / "static_report.json").write_text(json.dumps(dict(versions={"triton": "3.6.0"}, rows=[], problems=[])))
    rows = [dict(backend="ours-triton", mode="fwd", seqlen=2048, batch=8, ms=1.0, tflops=400.0, status="ok")]
    (tmp_path / "attention_dense.json").write_text(json.dumps(dict(environment={}, results=rows)))
    summary = reporting.session_summary(tmp_path, dict(device="NVIDIA H200", date="2026-12-01"))
    assert set(summary) == {"environment", "phases", "smoke", "static", "tables"}
    assert summary["phases"][1] == dict(phase="smoke", exit=1, seconds=80, budget=100)
    assert list(summary["tables"]) == ["dense"] and len(summary["smoke"]) == 2
    markdown = reporting.session_markdown(summary)
    assert "1 of 2 cases pass" in markdown and "## dense" in markdown and "total 141 s" in markdown


def test_autotune_limit_keeps_the_first_tiles_of_the_class_in_table_order(monkeypatch):
    from llm2vec_fast.kernels import launch

    table = {"half": [(64, 64, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)], "fp32": [(16, 32, 4, 2)]}
    monkeypatch.setattr(launch, "INTERPRETING", False)
    arguments = launch.autotuned(table)
    prune = arguments["prune_configs_by"]["early_config_prune"]
    named = dict(Q=torch.empty(1, dtype=torch.bfloat16))
    specs = lambda configs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]  # noqa: E731
    assert specs(prune(arguments["configs"], named, BLOCK_D=128)) == table["half"]
    monkeypatch.setenv(launch.TUNE_VARIABLE, "2")
    assert specs(prune(arguments["configs"], named, BLOCK_D=128)) == table["half"][:2]
    for bad in ("0", "two"):
        monkeypatch.setenv(launch.TUNE_VARIABLE, bad)
        with pytest.raises(ValueError, match=launch.TUNE_VARIABLE):
            launch.tune_limit()
