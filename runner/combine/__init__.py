"""Combination of the shards' global draws: one-shot methods, covariance, agreement, packing,
supports and summaries."""
