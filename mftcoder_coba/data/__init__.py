"""The prepared-data format: one home for what prep writes and training reads.

``layout`` (the shard record, file names, checksums), ``manifest`` (``manifest.json``: format, load, write)
and ``reader`` (:class:`PackedDataset`). Prep (``mftcoder_coba.data_prep``) writes with them and training,
evaluation and ``inspect`` read with them; nothing here imports prep, so the format cannot drift between the
writer and the reader.
"""
from mftcoder_coba.data.reader import IGNORE_INDEX, PackedDataset

__all__ = ["IGNORE_INDEX", "PackedDataset"]
