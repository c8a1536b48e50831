"""The ``qwen35`` command: ``generate`` and ``demo`` (``main.py``), ``chat`` (``chat.py``), what both use
(``common.py``), and the offline demo checkpoint (``demo.py``).

The top wing: may import any other.
"""
