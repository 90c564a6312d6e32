"""Offline evaluation of what a run trained: per-task loss on a prepared split, and code pass@k.

- :mod:`~mftcoder_coba.evaluation.loss`: per-task token loss and perplexity (``evaluate_split`` is the
  library entry the trainer can call on a test split);
- :mod:`~mftcoder_coba.evaluation.targets`: runs, exports, model directories and adapters as models;
- :mod:`~mftcoder_coba.evaluation.problems`, :mod:`~mftcoder_coba.evaluation.generation`,
  :mod:`~mftcoder_coba.evaluation.sandbox`, :mod:`~mftcoder_coba.evaluation.code_eval`,
  :mod:`~mftcoder_coba.evaluation.passk`: benchmark problems, completions, sandboxed execution, pass@k;
- :mod:`~mftcoder_coba.evaluation.vllm_engine`: the optional vLLM generation engine and the engine choice.

Only the light modules are imported here; the CLI commands ``eval`` and ``eval-code`` import what they use.
"""
from mftcoder_coba.evaluation.passk import mean_pass_at_k, pass_at_k

__all__ = ["mean_pass_at_k", "pass_at_k"]
