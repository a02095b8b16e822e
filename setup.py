"""udmtrain: distributed pretraining of discrete diffusion language models (UDM, AUDM, MDLM, ...)."""

from setuptools import find_packages, setup

setup(
    name="udmtrain",
    version="0.1.0",
    description="DeepSpeed pretraining of uniform, absorbing and masked discrete diffusion LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["udmtrain", "udmtrain.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tokenizers>=0.19",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "eval": ["transformers>=4.41", "matplotlib>=3.7", "mauve-text>=0.4"],
        # Hugging Face datasets sources of tools/prepare_data.py (openwebtext, wikitext-103, lm1b)
        # and parquet input.
        "hf": ["datasets>=2.14", "pyarrow>=12"],
        "dev": ["pytest>=8", "transformers>=4.41", "matplotlib>=3.7"],
    },
)
