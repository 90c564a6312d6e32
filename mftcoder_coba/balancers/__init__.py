"""Task-weighting balancers (filled in by the balancers work)."""
