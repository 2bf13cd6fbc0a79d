"""The kopf operator: reconciles ConsensusFit resources into Jobs and exports metrics. Never imports JAX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("consensusfit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
