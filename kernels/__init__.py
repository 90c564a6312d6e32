"""Per-task cross-entropy kernels (filled in by the kernels work)."""
