"""ColD Fusion: contributors fine-tune the shared model, the repository averages them."""
