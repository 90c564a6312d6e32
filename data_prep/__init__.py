"""Offline data preparation (filled in by the data-prep work)."""
