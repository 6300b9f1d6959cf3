"""No host syncs on the attention host path and in the encoder's per-batch forward (issue 10).

A host sync (the CPU waiting for the GPU to read a value back) stalls the launch queue and makes a
forward impossible to capture in a CUDA graph. There is no GPU here, so `no_host_syncs` makes every
operation that would sync on a GPU raise on CPU tensors: the ops torch tags as reading data back
(``_local_scalar_dense`` behind ``.item()``/``bool()``/``int()``/``float()``, ``equal``, ``allclose``), the ops
whose output shape depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``unique``,
``repeat_interleave`` without ``output_size``), the reads that bypass the dispatcher (``.tolist()``,
``.numpy()``, ``.cpu()``), and ``_local_scalar_dense``/``nonzero`` called inside another op's kernel.
Kernel launches are replaced by `LaunchRecorder`: the host code (layout preparation, tile schedule, GQA
packing, descriptor setup, autotuning key) is the subject, not Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func
from llm2vec_fast.backends import cuda as cuda_backend
from llm2vec_fast.backends import reference
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.hf import pack_batch, pack_sequences, route_attention, without_dropout
from llm2vec_fast.hf.attention import BACKEND_ATTRIBUTE, llm2vec_fast_attention, llm2vec_fast_mask
from llm2vec_fast.kernels import attention_bwd, attention_fwd
from llm2vec_fast.kernels.launch import PATH_VARIABLE
from llm2vec_fast.tiny import build_tiny_model
from llm2vec_fast.validation import check_host_offsets


class HostSync(AssertionError):
    """An operation that would make the host wait for the device."""


OWN_NAMESPACES = ("llm2vec_fast", "llm2vec_fast_cuda")
"""Our custom ops: the detector sees them as one op, so it runs their implementation under itself too."""
CPU_KERNELS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
READ_BACK_METHODS = ("tolist", "numpy", "cpu")
"""Tensor methods that copy to the host without dispatching an op on a CPU tensor."""


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


READ_BACK_OPS = ("is_nonzero",)
"""Composite ops that read a value back, untagged: below autograd (inside our custom ops) they arrive whole."""


def sync_reason(func, args: tuple, kwargs: dict) -> str | None:
    """Why `func(*args, **kwargs)` would sync on a GPU, or None."""
    name = func._schema.name.split("::")[-1]
    if torch.Tag.data_dependent_output in func.tags or name in READ_BACK_OPS:
        return "reads a device value back to the host"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return "boolean indices need nonzero" if _has_bool_index(args[1]) else None
    if name == "repeat_interleave":  # output_size is keyword-only in every overload
        needs_sum = func._overloadname != "self_int" and kwargs.get("output_size") is None
        return "repeats without output_size need their sum" if needs_sum else None
    if torch.Tag.dynamic_output_shape in func.tags:
        return "its output shape depends on the data"
    return None


class SyncDetector(TorchDispatchMode):
    """Raises HostSync on every dispatched op that `sync_reason` names."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            raise HostSync(f"host sync: {func} {reason}")
        if func.namespace in OWN_NAMESPACES:  # a mode is inactive inside its handler: re-enter it for our ops
            with self:
                return func.redispatch(CPU_KERNELS, *args, **kwargs)
        return func(*args, **kwargs)


def _refuse(name: str):
    def refuse(self, *args, **kwargs):
        raise HostSync(f"host sync: Tensor.{name}() copies a device tensor to the host")

    return refuse


KERNEL_SYNCS = ("_local_scalar_dense", "nonzero")
"""Replaced by raising CPU kernels too: an aten kernel calling them (segment_reduce's length check does) runs
below the mode, out of its sight."""


def _refuse_kernel(name: str):
    def refuse(*args, **kwargs):
        raise HostSync(f"host sync: aten.{name} called inside another op's kernel")

    return refuse


@contextlib.contextmanager
def no_host_syncs() -> Iterator[None]:
    """Inside: every operation that would sync with a GPU raises HostSync."""
    kernels = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": for this block only
            for name in KERNEL_SYNCS:
                kernels.impl(name, _refuse_kernel(name), "CPU")
        with pytest.MonkeyPatch.context() as patch:
            for name in READ_BACK_METHODS:
                patch.setattr(torch.Tensor, name, _refuse(name))
            with SyncDetector():
                yield
    finally:
        kernels._destroy()


# ------------------------------------------------------------------------------------- the detector


def _plant_in_reference(monkeypatch, plant) -> None:
    """The reference backend's forward with `plant` run first on its q: a sync inside our custom op."""
    original = reference.forward

    def forward(q, k, v, layout, options):
        plant(q)
        return original(q, k, v, layout, options)

    monkeypatch.setattr(reference, "forward", forward)


PLANTED = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "int": lambda x: int(x.sum()),
    "float": lambda x: float(x.sum()),
    "nonzero": lambda x: torch.nonzero(x),
    "bool_index": lambda x: x[x > 0],
    "bool_index_put": lambda x: x.clone().index_put_((x > 0,), torch.tensor(0.0)),
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    "repeat_interleave_self": lambda x: x.repeat_interleave(torch.ones(8, dtype=torch.long)),
    "equal": lambda x: torch.equal(x, x),
    "inside_a_kernel": lambda x: torch.segment_reduce(x, "sum", lengths=torch.tensor([3, 5])),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),
}


@pytest.mark.parametrize("plant", PLANTED.values(), ids=PLANTED.keys())
def test_detector_catches_planted_syncs(plant, monkeypatch):
    x = torch.randn(8)
    with pytest.raises(HostSync), no_host_syncs():
        plant(x)
    _plant_in_reference(monkeypatch, plant)  # the same sync inside our custom op's implementation
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(HostSync), no_host_syncs():
        flash_attn_func(q, q, q, backend="reference")
    with pytest.raises(HostSync), no_host_syncs():
        flash_attn_func(q, q, q, backend="reference").sum().backward()
    monkeypatch.undo()
    assert len(x.tolist()) == 8 and type(x.sum().item()) is float and x.nonzero().shape == (8, 1)  # restored


def test_detector_lets_sync_free_ops_through():
    x = torch.randn(8, 4)
    index = torch.tensor([3, 0, 1])
    with no_host_syncs():
        x[index], x.index_select(0, index), x.cumsum(0), x[1:3], x[:, None], torch.where(x > 0, x, 0)
        torch.repeat_interleave(index, torch.tensor([1, 2, 0]), output_size=3)
        x.index_put_((index,), torch.zeros(3, 4))
        x.repeat_interleave(2, dim=0)


# ------------------------------------------------------------------------------------- Triton host path


class LaunchRecorder:
    """Stands in for a ``@triton.jit``/autotuned kernel: records each ``kernel[grid](...)`` launch and checks what
    the launch itself would read on the host (its grid for every config, scalar and autotuning-key arguments)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args: tuple, kwargs: dict) -> None:
        names = list(getattr(self.kernel, "arg_names", None) or self.kernel.fn.arg_names)
        named = dict(zip(names, args))
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                assert isinstance(value, (int, float, bool)), f"{name} is a {type(value).__name__}"
        for key in getattr(self.kernel, "keys", ()):
            value = (named | kwargs).get(key, 0)  # the autotuner keys on the arguments it is given
            assert type(value) in (int, bool), f"autotuning key {key} is a {type(value).__name__}, not a host int"
        for config in getattr(self.kernel, "configs", None) or [None]:
            meta = {**kwargs, **(config.kwargs if config is not None else {})}
            size = grid(meta) if callable(grid) else grid
            assert all(type(n) is int and n >= 0 for n in size), f"grid {size}"
        self.launches.append(named | kwargs)


TRITON_KERNELS = (
    (attention_fwd, "attention_fwd_kernel"),
    (attention_bwd, "attention_bwd_preprocess_kernel"),
    (attention_bwd, "attention_bwd_kernel"),
    (attention_bwd, "attention_bwd_dkdv_kernel"),
    (attention_bwd, "attention_bwd_dq_kernel"),
)


@pytest.fixture
def recorded_launches(monkeypatch) -> dict[str, LaunchRecorder]:
    """Every Triton attention kernel replaced by a LaunchRecorder, by kernel name."""
    recorders = {}
    for module, name in TRITON_KERNELS:
        recorders[name] = LaunchRecorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    return recorders


def _qkv(shape_q: tuple, shape_kv: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in (shape_q, shape_kv, shape_kv)]


def _key_mask(batch: int, seqlen: int) -> torch.Tensor:
    """Left padding in row 0, right padding in row 1, a hole in row 2, all real in row 3."""
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[0, :5], mask[1, -7:], mask[2, 3:6] = False, False, False
    return mask


def _padded(backend: str, dtype: torch.dtype, masked: bool, **options):
    q, k, v = _qkv((4, 24, 4, 16), (4, 24, 2, 16), dtype)
    mask = _key_mask(4, 24) if masked else None
    with no_host_syncs():
        out = flash_attn_func(q, k, v, mask, backend=backend, **options)
        out.float().sum().backward()
    return out


LENGTHS = [5, 17, 0, 9, 24]


def _packed(backend: str, dtype: torch.dtype, **options):
    """Offsets built on the host from the lengths, as a caller that knows them does (`pack_sequences`)."""
    cu_seqlens = pack_sequences([[1] * n for n in LENGTHS]).cu_seqlens
    q, k, v = _qkv((sum(LENGTHS), 4, 16), (sum(LENGTHS), 2, 16), dtype)
    with no_host_syncs():
        out = flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max(LENGTHS), max(LENGTHS), backend=backend, **options
        )
        out.float().sum().backward()
    return out


OPTION_CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window_softcap": dict(window_size=(3, 2), softcap=5.0),
    "deterministic": dict(deterministic=True),
}


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
@pytest.mark.parametrize("path", ["ampere", "hopper"])
@pytest.mark.parametrize("layout", ["padded", "masked", "packed"])
def test_triton_host_path_never_syncs(recorded_launches, monkeypatch, layout, path, options):
    monkeypatch.setenv(PATH_VARIABLE, path)
    dtype = torch.bfloat16
    if layout == "packed":
        _packed("triton", dtype, **options)
    else:
        _padded("triton", dtype, layout == "masked", **options)
    forward = recorded_launches["attention_fwd_kernel"].launches
    assert len(forward) == 1
    assert forward[0]["IS_VARLEN"] == (layout == "packed") and forward[0]["HAS_MASK"] == (layout == "masked")
    assert forward[0]["PACK_GQA"] == (layout == "packed")  # GQA packing for packed batches (group 2)
    assert (forward[0]["SCHEDULE_BLOCK"] > 0) == (layout == "packed")  # the device-side tile schedule
    if path == "hopper" and layout == "padded" and options in ({}, {"deterministic": True}):
        assert forward[0]["HOPPER"]  # TMA descriptors and the warp-specialized loop
    fused = recorded_launches["attention_bwd_kernel"].launches
    pair = (
        recorded_launches["attention_bwd_dkdv_kernel"].launches + recorded_launches["attention_bwd_dq_kernel"].launches
    )
    assert len(recorded_launches["attention_bwd_preprocess_kernel"].launches) == 1
    assert (len(fused), len(pair)) == ((0, 2) if options.get("deterministic") else (1, 0))


def test_offsets_not_checked_on_the_host_sync_once_per_tensor(recorded_launches):
    """A caller's own offsets tensor is read back once (the cached check: a warm-up call before a graph capture),
    and again only after an in-place edit."""
    cu_seqlens = torch.tensor([0, 5, 22, 22], dtype=torch.int32)
    q, k, v = _qkv((22, 4, 16), (22, 2, 16), torch.float16)
    call = lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 17, 17, backend="triton")  # noqa: E731
    with pytest.raises(HostSync, match="tolist"), no_host_syncs():
        call()
    call()
    with no_host_syncs():
        call()
    cu_seqlens[1] = 6
    with pytest.raises(HostSync, match="tolist"), no_host_syncs():
        call()


def test_offsets_checked_on_the_host_are_still_checked():
    cu_seqlens = torch.tensor([0, 5, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_host_offsets(cu_seqlens, [0, 5, 3])
    cu_seqlens = pack_sequences([[1] * 5, [1] * 3]).cu_seqlens
    q, k, v = _qkv((8, 4, 16), (8, 2, 16), torch.float16)
    with pytest.raises(ValueError, match="longer than max_seqlen=4"), no_host_syncs():
        flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 4, 4, backend="triton")  # the bound: every call
    short = lambda: flash_attn_varlen_func(q[:7], k[:7], v[:7], cu_seqlens, cu_seqlens, 5, 5, backend="triton")  # noqa: E731
    with pytest.raises(HostSync, match="tolist"), no_host_syncs():  # another token count: read back from the device
        short()
    with pytest.raises(ValueError, match="ends at 8 but the packed tensor holds 7 tokens"):
        short()


# ------------------------------------------------------------------------------------- CUDA backend's Python side


class FakeExtension:
    """``torch.ops.llm2vec_fast_cuda`` as the CUDA backend calls it: outputs of the right shapes, calls counted."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fwd(self, q, k, v, key_bits, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options):
        self.calls.append("fwd")
        assert all(type(n) is int for n in (max_seqlen_q, max_seqlen_k))
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        return torch.zeros_like(q), torch.zeros(lse_shape)

    def bwd(self, dout, q, k, v, *rest):
        self.calls.append("bwd")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def pack_key_mask(self, key_mask):
        self.calls.append("pack_key_mask")
        return key_mask.new_zeros((key_mask.shape[0], (key_mask.shape[1] + 127) // 128 * 4), dtype=torch.int32)


@pytest.mark.parametrize("layout", ["padded", "masked", "packed"])
def test_cuda_backend_python_side_never_syncs(monkeypatch, layout):
    extension = FakeExtension()
    monkeypatch.setattr(torch.ops, "llm2vec_fast_cuda", extension, raising=False)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_backend, "unsupported_reason", lambda q, k, options: None)
    if layout == "packed":
        _packed("cuda", torch.float16, window_size=(4, 4))
    else:
        _padded("cuda", torch.float16, layout == "masked", causal=True)
    assert extension.calls == ["pack_key_mask"] * (layout == "masked") + ["fwd", "bwd"]


# ------------------------------------------------------------------------------------- HF attention layer


@pytest.mark.parametrize("layout", ["masked", "packed"])
def test_hf_attention_layer_never_syncs(recorded_launches, layout):
    """The transformers attention function (once per layer) never syncs; a padded batch's mask function (once
    per forward) syncs in its documented all-real shortcut only."""
    module = torch.nn.Module()
    setattr(module, BACKEND_ATTRIBUTE, "triton")
    query, key, value = (t.detach().transpose(1, 2) for t in _qkv((4, 24, 4, 16), (4, 24, 2, 16), torch.float16))
    kwargs = {}
    if layout == "masked":
        with pytest.raises(HostSync, match="_local_scalar_dense"), no_host_syncs():
            llm2vec_fast_mask(4, 24, 24, attention_mask=_key_mask(4, 24))
        mask = llm2vec_fast_mask(4, 24, 24, attention_mask=_key_mask(4, 24))
    else:
        query, key, value = (t.reshape(1, t.shape[1], 96, 16) for t in (query, key, value))
        cu_seqlens = pack_sequences([[1] * n for n in (40, 0, 56)]).cu_seqlens
        mask, kwargs = None, dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=56, max_length_k=56)
    with no_host_syncs():
        out, _ = llm2vec_fast_attention(module, query, key, value, mask, is_causal=False, **kwargs)
    assert out.shape == (query.shape[0], query.shape[2], 4, 16)
    assert recorded_launches["attention_fwd_kernel"].launches[0]["IS_VARLEN"] == (layout == "packed")


# ------------------------------------------------------------------------------------- encoder


LENGTHS_IN_BATCH = [6, 11, 3, 8]


def _token_ids() -> list[list[int]]:
    return [[3 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate(LENGTHS_IN_BATCH)]


def _padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch left-padded, as official-format features: (input_ids, attention_mask)."""
    width = max(LENGTHS_IN_BATCH)
    input_ids = torch.zeros(len(LENGTHS_IN_BATCH), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(_token_ids()):
        input_ids[row, width - len(ids) :], mask[row, width - len(ids) :] = torch.tensor(ids), 1
    return input_ids, mask


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos_token"])
@pytest.mark.parametrize("pack", ["sequences", "padded_batch"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_encoder_packed_forward_never_syncs(recorded_launches, monkeypatch, family, causal, pack, pooling_mode):
    """`embed_packed` on a tiny model (every layer through the Triton host path, launches recorded) never syncs:
    not in the model, its attention layers or the pooling. Its batch is packed from lengths known on the host
    (`encode`), or from a padded batch (`forward` on official features), which syncs there, intrinsically, once."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    model, tokenizer = build_tiny_model(family, seed=0)
    encoder = LLM2Vec(route_attention(model.model, causal=causal), tokenizer, pooling_mode=pooling_mode)
    with torch.inference_mode(), without_dropout(encoder.model):
        if pack == "sequences":
            packed = pack_sequences(_token_ids())
        else:
            with pytest.raises(HostSync, match="nonzero"), no_host_syncs():
                pack_batch(*_padded_ids())
            packed = pack_batch(*_padded_ids())
        instruction_lengths = torch.tensor([2, 0, 1, 3])
        with no_host_syncs():
            embeddings = encoder.embed_packed(packed, instruction_lengths)
    assert embeddings.shape == (4, model.config.hidden_size)
    launches = recorded_launches["attention_fwd_kernel"].launches
    assert len(launches) == model.config.num_hidden_layers
    assert all(launch["IS_VARLEN"] and launch["WINDOW_RIGHT"] == causal for launch in launches)


# ------------------------------------------------------------------------------------- on a GPU


def _gpu_run(layout: str):
    """A warm-up-able forward and backward (attention) or forward (encoder) on CUDA tensors, inputs made here."""
    if layout == "encoder":
        model, tokenizer = build_tiny_model("llama", seed=0)
        encoder = LLM2Vec(route_attention(model.model.cuda(), causal=False), tokenizer)
        packed = pack_sequences(_token_ids(), device="cuda")
        instruction_lengths = torch.tensor([2, 0, 1, 3], device="cuda")

        def run():
            with torch.inference_mode(), without_dropout(encoder.model):
                encoder.embed_packed(packed, instruction_lengths)

        return run
    if layout == "packed":
        cu_seqlens = pack_sequences([[1] * n for n in LENGTHS], device="cuda").cu_seqlens
        q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv((55, 4, 16), (55, 2, 16), torch.bfloat16))
        return lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 24, 24).float().sum().backward()
    mask = _key_mask(4, 24).cuda()
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv((4, 24, 4, 16), (4, 24, 2, 16), torch.bfloat16))
    return lambda: flash_attn_func(q, k, v, mask).float().sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["masked", "packed", "encoder"])
def test_torch_sync_detector_agrees_on_a_gpu(monkeypatch, layout):
    """torch's own detector, on the Triton backend: no sync after one warm-up call (compiling and autotuning a
    kernel synchronize, once per configuration)."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    run = _gpu_run(layout)
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
