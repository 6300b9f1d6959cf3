"""Compile the Triton kernels for real GPUs (sm_80, sm_90a) on this GPU-less machine: the static report's checks.

The interpreter (used by the numerical tests) accepts programs the GPU compiler rejects, and says nothing
about registers, shared memory or the instructions a tile compiles to. Here every shipped tile of
kernels/catalog.py is compiled once (benchmarks/kernel_report.py's jobs, two worker processes) and must
pass ``kernel_report.problems``, the checks of ``kernel_report.py --check``: on sm_90a (H100/H200, the
target; every kernel, class and layout a launch dispatches) no spill, no mma.sync, shared memory within the
block limit, asynchronous loads; on sm_80 the same
except that each (kernel, class, layout) needs one spill-free tile. Feature variants (windows, softcap,
cross attention, padded head dims) must compile.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_report import ARCHS, problems, row_label, triton_jobs  # noqa: E402
from triton_static import SHARED_LIMIT, TileJob, compile_tile, compiler_pool  # noqa: E402

from llm2vec_fast.kernels.catalog import KERNELS  # noqa: E402

SHIPPED = triton_jobs(ARCHS)
FEATURES = {
    "window+softcap+holes": dict(WINDOW_LEFT=True, WINDOW_RIGHT=True, SOFTCAP=True),
    "varlen causal": dict(IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False, WINDOW_RIGHT=True),
    "cross-attention mask": dict(MASK_QUERIES=False, GROUP=1),
}
ATTENTION = ("fwd", "bwd", "dkdv", "dq")
VARIANTS = [
    TileJob(kernel, "half", KERNELS[kernel].specs("half")[-1], arch, feature, FEATURES[feature])
    for feature in sorted(FEATURES)
    for kernel in ATTENTION
    for arch in KERNELS[kernel].archs
]
AMPERE_GROUPS = {}  # (kernel, class, layout) -> its sm_80 tiles
for shipped in SHIPPED:
    if shipped.arch == "sm_80":
        AMPERE_GROUPS.setdefault(f"{shipped.kernel}-{shipped.input_class}-{shipped.variant}", []).append(shipped)
HEAD_DIM_80 = [
    TileJob("fwd", "half", spec, "sm_90a", "head dim 80", dict(HEAD_DIM=80, BLOCK_D=128))
    for spec in KERNELS["fwd"].specs("half")
]


def job_id(job: TileJob) -> str:
    block_m, block_n, warps, stages = job.spec
    return f"{job.kernel}-{job.arch}-{job.input_class}-{job.variant}-{block_m}x{block_n}w{warps}s{stages}"


@pytest.fixture(scope="module")
def compiled(request):
    """jobs -> report rows, each job compiled once in worker processes started with the interpreter off.
    Alone, the session submits every job its selected tests need at once, to two workers; under xdist
    (one process per core already) each test submits its own jobs, to one worker."""
    distributed = hasattr(request.config, "workerinput")
    with compiler_pool(1 if distributed else 2) as pool:
        futures = {}

        def submit(jobs):
            for job in jobs:
                if job not in futures:
                    futures[job] = pool.submit(compile_tile, job)

        if not distributed:
            for item in request.session.items:
                params = getattr(item, "callspec", None)
                if item.module is request.module and params is not None:
                    submit(params.params.get("jobs", [params.params.get("job")]))

        def rows(jobs):
            submit(jobs)
            return [futures[job].result().row() for job in jobs]

        yield rows


@pytest.mark.parametrize("job", [job for job in SHIPPED if job.arch == "sm_90a"], ids=job_id)
def test_hopper_tile_passes_the_report_check(compiled, job):
    rows = compiled([job])
    assert not problems(rows), problems(rows)


@pytest.mark.parametrize("jobs", list(AMPERE_GROUPS.values()), ids=list(AMPERE_GROUPS))
def test_ampere_tiles_fit_and_one_is_spill_free(compiled, jobs):
    rows = compiled(jobs)
    assert not problems(rows), problems(rows)


@pytest.mark.parametrize("job", VARIANTS, ids=job_id)
def test_feature_variants_compile_and_fit(compiled, job):
    (row,) = compiled([job])
    assert row["shared_bytes"] <= SHARED_LIMIT[job.arch], row_label(row)


@pytest.mark.parametrize("jobs", [HEAD_DIM_80], ids=["fwd-sm_90a-head-dim-80"])
def test_padded_head_dim_has_a_spill_free_tile(compiled, jobs):
    """Head dim 80 runs in 128-wide tiles with masked columns; the autotuner needs a clean choice."""
    rows = compiled(jobs)
    assert any(row["spill_bytes"] == 0 for row in rows), [row_label(row) for row in rows]
