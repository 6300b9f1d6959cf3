"""Compile the Triton kernels for real GPUs (sm_80, sm_90a) on this GPU-less machine and read ptxas.

The interpreter (used by the numerical tests) accepts programs the GPU compiler rejects, and says
nothing about registers or shared memory. Here every tile configuration the autotuner may pick is
compiled: on sm_90a (H100/H200, the target) it must not spill, must fit in shared memory and must
be software-pipelined (async copies); on sm_80 it must fit, and each kernel keeps at least one
spill-free choice. Feature variants (windows, softcap, padded head dims, varlen) must compile.
"""

import pytest
from triton_compile import compile_kernel, compiler_process

from llm2vec_fast.kernels import attention_bwd, attention_fwd

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use
CLASS_INPUT = {"half": ("bf16", 128), "half_wide": ("bf16", 256), "fp32": ("fp32", 128)}
KERNELS = {
    "fwd": ("attention_fwd_kernel", attention_fwd.FWD_TILES),
    "dkdv": ("attention_bwd_dkdv_kernel", attention_bwd.DKDV_TILES),
    "dq": ("attention_bwd_dq_kernel", attention_bwd.DQ_TILES),
}


@pytest.fixture(scope="module")
def compiler():
    with compiler_process() as pool:
        yield lambda *args: pool.submit(compile_kernel, *args).result()


def pointer_types(dtype: str) -> dict:
    element = f"*{dtype}"
    return dict(
        Q=element,
        K=element,
        V=element,
        Out=element,
        DOut=element,
        DK=element,
        DV=element,
        DQ=element,
        Lse="*fp32",
        Delta="*fp32",
        DLse="*fp32",
        KeyMask="*u8",
        KeySpans="*i32",
        NumSpans="*i32",
        CuSeqlensQ="*i32",
        CuSeqlensK="*i32",
    )


def flags(dtype: str, head_dim: int, **overrides) -> dict:
    values = dict(
        GROUP=4,
        HEAD_DIM=head_dim,
        BLOCK_D=1 << (head_dim - 1).bit_length(),
        IS_VARLEN=False,
        HAS_MASK=True,
        MASK_QUERIES=True,
        WINDOW_LEFT=False,
        WINDOW_RIGHT=False,
        SOFTCAP=False,
        UPCAST=False,
        PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    values.update(overrides)
    return values


def compile_spec(compiler, kernel_name, input_class, spec, arch, **overrides):
    dtype, head_dim = CLASS_INPUT[input_class]
    block_m, block_n, num_warps, num_stages = spec
    constexprs = flags(dtype, head_dim, BLOCK_M=block_m, BLOCK_N=block_n, **overrides)
    return compiler(KERNELS[kernel_name][0], pointer_types(dtype), constexprs, arch, num_warps, num_stages)


SHIPPED = [
    (name, input_class, spec)
    for name, (_, table) in KERNELS.items()
    for input_class, specs in table.items()
    for spec in specs
]


@pytest.mark.parametrize("kernel_name,input_class,spec", SHIPPED)
def test_hopper_tiles_do_not_spill(compiler, kernel_name, input_class, spec):
    report = compile_spec(compiler, kernel_name, input_class, spec, 90)
    assert report.spill_bytes == 0, report
    assert report.shared_bytes <= SHARED_LIMIT[90], report
    assert report.async_copies > 0, f"loads are not software-pipelined: {report}"
    if input_class == "half":
        packed = compile_spec(
            compiler, kernel_name, input_class, spec, 90, IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False
        )
        assert packed.spill_bytes == 0, packed


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_ampere_tiles_fit_and_one_is_spill_free(compiler, kernel_name):
    reports = [compile_spec(compiler, kernel_name, "half", spec, 80) for spec in KERNELS[kernel_name][1]["half"]]
    assert all(report.shared_bytes <= SHARED_LIMIT[80] for report in reports), reports
    assert any(report.spill_bytes == 0 for report in reports), reports


FEATURES = {
    "window+softcap+holes": dict(WINDOW_LEFT=True, WINDOW_RIGHT=True, SOFTCAP=True),
    "varlen causal": dict(IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False, WINDOW_RIGHT=True),
    "cross-attention mask": dict(MASK_QUERIES=False, GROUP=1),
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_variants_compile(compiler, arch, kernel_name, feature):
    spec = KERNELS[kernel_name][1]["half"][-1]
    report = compile_spec(compiler, kernel_name, "half", spec, arch, **FEATURES[feature])
    assert report.shared_bytes <= SHARED_LIMIT[arch]


def test_padded_head_dim_has_a_spill_free_tile(compiler):
    """Head dim 80 runs in 128-wide tiles with masked columns; the autotuner needs a clean choice."""
    kernel_name, table = KERNELS["fwd"]
    reports = []
    for block_m, block_n, warps, stages in table["half"]:
        constexprs = flags("fp16", 80, BLOCK_M=block_m, BLOCK_N=block_n)
        reports.append(compiler(kernel_name, pointer_types("fp16"), constexprs, 90, warps, stages))
    assert any(report.spill_bytes == 0 for report in reports), reports


@pytest.mark.parametrize("arch", [80, 90])
def test_preprocess_compiles(compiler, arch):
    preprocess = dict(HEAD_DIM=80, BLOCK_D=128, IS_VARLEN=True, HAS_DLSE=True, BLOCK_M=64)
    report = compiler("attention_bwd_preprocess_kernel", pointer_types("fp16"), preprocess, arch, 4, 1)
    assert report.spill_bytes == 0
