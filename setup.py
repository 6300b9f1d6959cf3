"""Build llm2vec-fast: the Python package, its Triton kernels, and (where CUDA is present) the CUDA extension."""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

# kernels/ (Triton) and csrc/cpu/ (the fused CPU ops, compiled on first use: llm2vec_fast/cpu_fused.py) ship inside
# the package.
PACKAGES = find_packages(include=["llm2vec_fast", "llm2vec_fast.*"])
PACKAGES += ["llm2vec_fast.kernels", "llm2vec_fast._cpu_source"]

# ---- the optional CUDA extension llm2vec_fast._cuda (csrc/) ----------------------------------------
# LLM2VEC_FAST_BUILD_CUDA=1 forces it (an error if impossible), =0 skips it, unset builds it when
# torch is a CUDA build and nvcc is found. torch must be importable while building, hence
# `pip install --no-build-isolation .` (pyproject.toml lists only setuptools on purpose).
BUILD_CUDA_ENV = "LLM2VEC_FAST_BUILD_CUDA"
# Targets with no TORCH_CUDA_ARCH_LIST and no visible GPU: A100 (sm_80) and H100/H200 (sm_90a).
DEFAULT_ARCHS = ("8.0", "9.0a")
HOPPER_ARCH = "9.0a"
HOPPER_SOURCES = ("fwd_sm90_*.cu", "bwd_sm90_*.cu")  # the Hopper forward and backward
HOPPER_GENCODE = ["-gencode", "arch=compute_90a,code=sm_90a"]
ROOT = Path(__file__).resolve().parent


def _cuda_blocker():
    """Why the CUDA extension cannot be built in this environment, or None."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as error:
        return f"torch is not importable while building ({error}); build with `pip install --no-build-isolation .`"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return None


def _cuda_archs():
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' capabilities, else DEFAULT_ARCHS; only sm_80 and
    newer (cp.async, bf16 tensor cores), Hopper as 9.0a."""
    import torch

    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    if given:
        archs = [a for a in given.split(";") if a]
    elif torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = [f"{major}.{minor}" for major, minor in sorted(capabilities)]
    else:
        archs = list(DEFAULT_ARCHS)
    archs = [a for a in archs if a[0].isdigit() and int(a.split(".")[0]) >= 8]
    return [a.replace("9.0", "9.0a", 1) if a.split("+")[0] == "9.0" else a for a in archs]


def _say(message):
    """One line on stderr, once per install: pip also runs setup.py for metadata, stay quiet then."""
    if not {"egg_info", "dist_info"} & set(sys.argv[1:]):
        print(f"llm2vec-fast: {message}", file=sys.stderr)


def _cuda_extension():
    """setup() arguments that build the extension, or {} (saying why in one line)."""
    mode = os.environ.get(BUILD_CUDA_ENV, "").strip()
    if mode == "0":
        _say(f"{BUILD_CUDA_ENV}=0, installing the Triton-only package")
        return {}
    reason = _cuda_blocker()
    archs = _cuda_archs() if reason is None else []
    if reason is None and not archs:
        reason = "no target GPU architecture is sm_80 or newer (TORCH_CUDA_ARCH_LIST)"
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"{BUILD_CUDA_ENV}=1 but the CUDA extension cannot be built: {reason}")
        _say(f"installing the Triton-only package (no CUDA extension): {reason}")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # The Hopper forward and backward (csrc/fwd_sm90_*.cu, bwd_sm90_*.cu) are built for sm_90a alone, and only when
    # 9.0a is a target; every other file for every target (Hopper runs their deterministic backward). The binding
    # then dispatches on the device.
    hopper = any(a.split("+")[0] == HOPPER_ARCH for a in archs)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    sources = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").glob("*.cu")
        if not any(path.match(pattern) for pattern in HOPPER_SOURCES)
    )
    defines = ["-DLLM2VEC_FAST_SM90"] if hopper else []
    extension = CUDAExtension(
        name="llm2vec_fast._cuda",
        sources=sources + ["csrc/flash_api.cpp"],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", *defines], "nvcc": ["-O3", "-lineinfo"]},  # torch adds -std=c++20
    )
    _say(f"building the CUDA extension for {';'.join(archs)}")
    build_ext = BuildExtension.with_options(use_ninja=True)
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": _with_hopper_objects(build_ext) if hopper else build_ext},
    }


def _with_hopper_objects(build_ext):
    """build_ext that first compiles csrc/fwd_sm90_*.cu and bwd_sm90_*.cu for sm_90a only (in parallel, with plain
    nvcc: they include no torch header) and links the objects into the extension; torch's own build applies one arch
    list to all. They share std::string with the binding, hence torch's C++ ABI flag."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"

    class BuildWithHopper(build_ext):
        def build_extension(self, ext):
            import subprocess
            from concurrent.futures import ThreadPoolExecutor

            out_dir = Path(self.build_temp) / "sm90"
            out_dir.mkdir(parents=True, exist_ok=True)
            nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
            flags = ["-std=c++20", "-O3", "-lineinfo", "-Xcompiler", "-fPIC", abi, f"-I{ROOT / 'csrc'}"]
            flags += HOPPER_GENCODE

            def compile_one(source):
                target = out_dir / (source.stem + ".o")
                subprocess.run([nvcc, *flags, "-c", str(source), "-o", str(target)], check=True)
                return str(target)

            sources = sorted(path for pattern in HOPPER_SOURCES for path in (ROOT / "csrc").glob(pattern))
            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                ext.extra_objects = [*ext.extra_objects, *pool.map(compile_one, sources)]
            super().build_extension(ext)

    return BuildWithHopper


setup(
    name="llm2vec-fast",
    version="0.1.0",
    description="Fused bidirectional flash attention (Triton/CUDA) for turning decoder LLMs into text encoders",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"llm2vec_fast.kernels": "kernels", "llm2vec_fast._cpu_source": "csrc/cpu"},
    package_data={"llm2vec_fast.training": ["presets/*.json"], "llm2vec_fast._cpu_source": ["*.cpp"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        # Supported ranges, both ends tested by .ci/run (job 1: newest; job 2: these lower bounds). peft < 0.18
        # cannot be imported with transformers 5 (it imports the removed HybridCache).
        "transformers>=5.17,<6",
        "peft>=0.18",
        "accelerate>=1.0",
        "safetensors",
        "tqdm",
        "numpy",
        "matplotlib",
        "ninja",  # torch's JIT build of the fused CPU ops (llm2vec_fast/cpu_fused.py)
    ],
    extras_require={
        # Both ends tested: sentence-transformers 5.4 (the first to hand prompts to preprocess apart from the
        # texts) and 6.2; mteb 2.20 and 2.26. [train] brings datasets for SentenceTransformerTrainer.
        "sentence-transformers": ["sentence-transformers[train]>=5.4,<7"],
        "mteb": ["mteb>=2.20,<3"],
        # The Ray Data recipe (llm2vec_fast/ray_encode.py); tested with 2.60 (.ci/run, last job).
        "ray": ["ray[data]>=2.60,<3"],
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "tokenizers",
            "sentence-transformers[train]>=5.4,<7",
            "mteb>=2.20,<3",
        ],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
    **_cuda_extension(),
)
