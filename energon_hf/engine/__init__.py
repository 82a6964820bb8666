"""The engine: packed batches, the KV cache, the model runner, sampling and generation."""
