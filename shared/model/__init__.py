"""Model parts: per-family splitting, adapters, quantized bases, loading, the loss and the optimizer."""
