"""Per-task cross-entropy for multitask fine-tuning: the loss, per-task sums and counts, and the gradient,
from one sweep over the logits (or over the LM head, without ever forming the logits).

Public API::

    loss, task_loss_sum, task_token_count = task_cross_entropy(logits, labels, task_ids, task_scale)
    loss, task_loss_sum, task_token_count = linear_task_cross_entropy(hidden, weight, labels, task_ids,
                                                                      task_scale, bias=None)

``loss = Σ_{i counted} task_scale[task_i] · ce_i`` (float32 scalar, differentiable), ``task_loss_sum[t] =
Σ ce_i`` over task t's counted tokens (float32, no grad), ``task_token_count[t]`` their number (int64, no
grad). A token is counted when its label is not ``ignore_index``. Task ids of ignored tokens are never used,
so padding may carry any task id (``-1`` by this project's data convention).

Modes (keyword-only):

- ``check=True`` (or the environment variable ``MFTCODER_COBA_CHECK_IDS=1``): before the kernel, raise
  :class:`~mftcoder_coba.errors.UserError` naming the first token whose label is outside ``[0, V)`` or whose
  task id is outside ``[0, T)`` while its label is not ignored. It reads a flag back to the host, so it
  synchronises and breaks ``torch.compile`` graphs: a debugging mode. Unchecked, such tokens are left out
  (ce 0, zero gradient, not counted); no kernel ever reads or writes outside its tensors.
- ``inplace=True`` (``task_cross_entropy`` only): the gradient is written over the logits' own storage, so
  no second (N, V) buffer exists. The logits' values are gone after the call; autograd's version counter
  raises if anything else saved them for its backward. Eager mode; under ``torch.compile`` the compiler may
  copy the logits first, which defeats the purpose.

Under ``torch.no_grad()`` (or when nothing requires grad) the kernels only read: sums and counts, no
gradient written. With gradients the backward is a scale by the upstream gradient, in place, skipped on the
device when that gradient is exactly 1 (so fold constants such as 1/accumulation-steps into ``task_scale``),
and a graph through these functions supports one backward. ``task_scale`` is treated as a constant. The
calls are custom ops without host synchronisation (``torch.compile(fullgraph=True)``, CUDA graphs); under
``torch.compile`` the in-place scale becomes a copy, one extra pass over the gradient, so for full speed
keep the loss outside the compiled region.

``impl``: ``"triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked PyTorch,
any device) or ``"auto"`` (Triton on CUDA, PyTorch otherwise).
"""
if __name__ == "mftcoder_coba.kernels":
    from .api import linear_task_cross_entropy, task_cross_entropy
    from .task_ce_torch import reference_task_cross_entropy

    __all__ = ["task_cross_entropy", "linear_task_cross_entropy", "reference_task_cross_entropy"]
else:
    # Reached as a top-level ``kernels`` because the repository root is on sys.path (``python -m pytest`` from
    # the checkout): transformers probes for the Hugging Face ``kernels`` package by importing that name.
    # Registering the custom ops a second time would corrupt the first registration (a crash at the next
    # call), so stay inert and look like a stray namespace folder (no ``__file__``), which transformers
    # treats as "not installed".
    del __file__
