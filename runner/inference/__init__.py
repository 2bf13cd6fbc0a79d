"""Inference: NUTS programs, the program store, cores, runtime, tempering, diagnostics, and the
conditional re-sampling of group-level sites. Importing a module here may import JAX."""
