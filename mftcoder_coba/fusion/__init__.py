"""ColD Fusion: contributors fine-tune the shared model, the repository averages them.

``average_models`` is the fusion step (full weights, or LoRA updates averaged exactly); ``run_cold_fusion``
runs the whole loop locally from a :class:`FusionConfig` (``mftcoder-coba cold-fusion``).
"""
from mftcoder_coba.fusion.average import average_models, inspect_model_dir
from mftcoder_coba.fusion.cold_fusion import (
    Contributor,
    FusionConfig,
    UnseenTask,
    format_summary,
    load_fusion_config,
    run_cold_fusion,
)

__all__ = ["Contributor", "FusionConfig", "UnseenTask", "average_models", "format_summary", "inspect_model_dir",
           "load_fusion_config", "run_cold_fusion"]
