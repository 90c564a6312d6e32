"""Model building: transformers causal LMs, LoRA, CGC-LoRA."""
