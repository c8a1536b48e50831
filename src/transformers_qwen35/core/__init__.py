"""What every wing above shares: the configuration classes, the decoding state (``Qwen3_5HybridCache``), and the
attention mask with the output field names transformers gives the cache.

Imports ``kernels`` only. Generation, training and the model classes all build on these, so none of them has to import
another to get them.
"""
