"""QoQ quantization math (offline, NumPy/torch): the number formats and the accuracy transforms."""
