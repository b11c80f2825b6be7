"""Baselines kvstore is compared against (kept out of the kvstore package)."""
