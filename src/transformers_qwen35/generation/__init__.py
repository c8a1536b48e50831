"""Decoding: ``Qwen3_5GenerationMixin`` (the ``generate()`` of the generating heads), the static decoding loop with
CUDA graphs, self-speculative decoding with the MTP head, the model cards' sampling, the thinking budget.

Imports ``kernels`` and ``core``. Like transformers' ``GenerationMixin``, it receives the model and asks it (its text
model, its MTP head); the model classes import it, never the reverse.
"""
