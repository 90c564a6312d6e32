"""mftcoder-coba: multitask fine-tuning of code LLMs with the CoBa convergence balancer.

Sub-packages: ``data_prep`` (offline tokenising and packing), ``data`` (memory-mapped shard reader),
``kernels`` (per-task cross-entropy in one pass), ``balancers`` (CoBa and baselines), ``models``
(model building, LoRA, CGC-LoRA), ``fusion`` (ColD Fusion), the trainer, and ``commands`` (the console
command's sub-commands: argument parsing only, calling the rest).
"""

__version__ = "0.1.0"
