"""Local use: the pipeline of `consensusfit run`, the report, plots and simulated data."""
