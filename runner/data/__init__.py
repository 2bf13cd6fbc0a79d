"""Shard data: reading and checking rows, shape buckets, balance, group counts, column statistics."""
