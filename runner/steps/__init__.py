"""The steps of docs/contract.md, each `run(spec, layout, options) -> termination message`:
partition, sample, combine, resample, and the local reference; messages.py owns every message."""
