"""FLQ: federated learning with quantized, lazily aggregated updates."""

__version__ = "0.1.0"
