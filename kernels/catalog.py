"""The shipped Triton kernels, one entry each: what the static report (benchmarks/kernel_report.py) and the
compile tests (tests/test_triton_compile.py) compile for every architecture the kernels ship on.

Registering a kernel is one line in ``KERNELS``: its jit function's name, its module, its tile table
(input class -> ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``) and, where a launch on one architecture
passes constexpr flags of its own (a Hopper/TMA switch, say), those flags under that architecture's name.
A kernel that ships on one architecture only names it in ``archs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from . import attention_bwd, attention_fwd
from .launch import TileSpec

ARCHS = ("sm_80", "sm_90a")
# The dtype and head dim each input class (launch.input_class) is compiled at.
CLASS_INPUT = {"half": ("bf16", 128), "half_wide": ("bf16", 256), "fp32": ("fp32", 128)}
# Batch layouts a launch specialises on, as flags over launch_flags' padded batch.
LAYOUTS = {
    "padded": {},
    "dense": dict(HAS_MASK=False, MASK_QUERIES=False),
    "packed": dict(IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False),
    # The forward's packed launches: the device-side tile schedule, with and without GQA packing.
    "scheduled": dict(IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False, SCHEDULE_BLOCK=64),
    "scheduled_gqa": dict(IS_VARLEN=True, HAS_MASK=False, MASK_QUERIES=False, SCHEDULE_BLOCK=64, PACK_GQA=True),
}


@dataclass(frozen=True)
class Kernel:
    """One shipped ``@triton.jit`` function (autotuned or not) and the tiles and flags it is launched with."""

    name: str  # the jit function's name in `module`
    module: ModuleType
    tiles: dict[str, list[TileSpec]]  # input class -> tile specs a launch may pick
    archs: tuple[str, ...] = ARCHS
    arch_flags: dict[str, dict] = field(default_factory=dict)  # arch -> constexpr flags a launch passes there
    arch_tiles: dict[str, dict[str, list[TileSpec]]] = field(default_factory=dict)  # arch -> tiles added there
    flags: dict = field(default_factory=dict)  # constexpr flags every launch passes (beyond launch_flags)
    class_flags: dict[str, dict] = field(default_factory=dict)  # input class -> constexpr flags launches pass there
    layouts: tuple[str, ...] = tuple(LAYOUTS)  # the LAYOUTS its launches specialise on

    @property
    def function(self):
        return getattr(self.module, self.name)

    def tables(self, arch: str) -> dict[str, list[TileSpec]]:
        """Input class -> the tiles launches on `arch` tune over: `tiles` plus that arch's `arch_tiles`."""
        extra = self.arch_tiles.get(arch, {})
        return {name: self.tiles.get(name, []) + extra.get(name, []) for name in dict.fromkeys([*self.tiles, *extra])}

    def specs(self, input_class: str, arch: str = "sm_90a") -> list[TileSpec]:
        return self.tables(arch).get(input_class, [])


_BWD_LAYOUTS = ("padded", "dense", "packed")  # the backward has no tile schedule: "scheduled" would be "packed"
_FWD_FLAGS = dict(TMA=False, HOPPER=False, NEGATIVE_SCALE=False, EVEN_KEYS=False, PACK_GQA=False, SCHEDULE_BLOCK=0)
KERNELS: dict[str, Kernel] = {
    "fwd": Kernel(
        "attention_fwd_kernel",
        attention_fwd,
        attention_fwd.FWD_TILES,
        arch_tiles={"sm_80": attention_fwd.FWD_AMPERE_TILES},
        flags=_FWD_FLAGS,
        layouts=("padded", "dense", "scheduled", "scheduled_gqa"),
    ),
    "fwd_hopper": Kernel(  # TMA + warp specialization: unmasked 16-bit batches on sm_90a (see warp_specialized)
        "attention_fwd_kernel",
        attention_fwd,
        attention_fwd.FWD_HOPPER_TILES,
        archs=("sm_90a",),
        flags=_FWD_FLAGS | dict(TMA=True, HOPPER=True),
        layouts=("dense", "scheduled", "packed"),  # packed: over SCHEDULE_CHUNK sequences, no schedule loop
    ),
    "fwd_tma": Kernel(  # TMA descriptor loads in the span walk: masked and GQA-packed 16-bit batches on sm_90a
        "attention_fwd_kernel",
        attention_fwd,
        {name: attention_fwd.FWD_TILES[name] for name in ("half", "half_wide")},
        archs=("sm_90a",),
        flags=_FWD_FLAGS | dict(TMA=True),
        layouts=("padded", "scheduled_gqa"),
    ),
    "bwd": Kernel(  # see _fused
        "attention_bwd_kernel", attention_bwd, attention_bwd.BWD_TILES, archs=("sm_90a",), layouts=_BWD_LAYOUTS
    ),
    "dkdv": Kernel(
        "attention_bwd_dkdv_kernel",
        attention_bwd,
        attention_bwd.DKDV_TILES,
        arch_tiles={"sm_80": attention_bwd.DKDV_AMPERE_TILES},
        layouts=_BWD_LAYOUTS,
        flags=dict(SPLIT_D=1),
        class_flags={name: dict(SPLIT_D=attention_bwd.dkdv_split(CLASS_INPUT[name][1])) for name in CLASS_INPUT},
    ),
    "dq": Kernel("attention_bwd_dq_kernel", attention_bwd, attention_bwd.DQ_TILES, layouts=_BWD_LAYOUTS),
    "preprocess": Kernel(
        "attention_bwd_preprocess_kernel",
        attention_bwd,
        # One tile (Triton's default 4 warps, 1 stage) at every class: O and dO rows are HEAD_DIM wide.
        {name: [(attention_bwd._PREPROCESS_BLOCK_M, 0, 4, 1)] for name in CLASS_INPUT},
        flags={"HAS_DLSE": True},
        layouts=("padded", "packed"),
    ),
}


def kernel_named(function_name: str) -> Kernel:
    """The catalog entry of jit function `function_name` (several entries may share one function)."""
    for kernel in KERNELS.values():
        if kernel.name == function_name:
            return kernel
    raise ValueError(f"no shipped Triton kernel named {function_name!r} in kernels/catalog.py")


def launch_flags(kernel: Kernel, input_class: str, arch: str, **overrides) -> dict:
    """The constexpr flags of a padded-batch launch (key mask, GQA 4:1) at `input_class`, as the launchers
    pass them on a GPU (no interpreter upcast), then the kernel's own and its arch's flags, then `overrides`."""
    dtype, head_dim = CLASS_INPUT[input_class]
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
    values.update(kernel.flags)
    values.update(kernel.class_flags.get(input_class, {}))
    values.update(kernel.arch_flags.get(arch, {}))
    values.update(overrides)
    return values


def argument_types(dtype: str) -> dict:
    """Triton signature types of the kernels' pointer arguments for inputs of `dtype` (others: i32/fp32)."""
    element = f"*{dtype}"
    tensors = dict.fromkeys(("Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ"), element)
    return tensors | dict(
        DQAccum="*fp32",
        Lse="*fp32",
        Delta="*fp32",
        DLse="*fp32",
        KeyMask="*u8",
        KeySpans="*i32",
        NumSpans="*i32",
        CuSeqlensQ="*i32",
        CuSeqlensK="*i32",
    )
