"""How the layer math runs: the exact PyTorch ops (``reference/``), fla-core's Triton kernels behind one dispatch
(``dispatch.py``, chosen per call by device), the Hopper backward workaround, and what module hooks and captured CUDA
graphs depend on.

The bottom wing: imports nothing else of this package.
"""
