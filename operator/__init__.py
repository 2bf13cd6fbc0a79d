"""The kopf operator: reconciles ConsensusFit resources into Jobs and exports metrics. Never imports JAX."""
