"""Build llm2vec-fast: the Python package, its Triton kernels, and (where CUDA is present) the CUDA extension."""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["llm2vec_fast", "llm2vec_fast.*"]) + ["llm2vec_fast.kernels"]

setup(
    name="llm2vec-fast",
    version="0.1.0",
    description="Fused bidirectional flash attention (Triton/CUDA) for turning decoder LLMs into text encoders",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"llm2vec_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17",
        "peft>=0.17",
        "accelerate>=1.0",
        "safetensors",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "tokenizers", "sentence-transformers", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
)
