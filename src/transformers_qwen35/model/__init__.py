"""The models: text layers and models, the vision tower, the multimodal model and its 3-D positions, the MTP head,
classification heads, and what they load (official presets, the checkpoint layout, packed-sample detection).

Imports ``kernels``, ``core``, ``training`` and ``generation``.
"""
