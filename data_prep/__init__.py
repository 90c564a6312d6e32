"""Offline data preparation: multitask records -> packed, memory-mapped binary shards with task ids.

``prepare(PrepOptions(...))`` is what ``mftcoder-coba prep`` runs; ``mftcoder_coba.data.PackedDataset``
reads the result.
"""
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare

__all__ = ["PrepOptions", "prepare"]
