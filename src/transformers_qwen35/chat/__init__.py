"""Talking to the model: the chat template (thinking / non-thinking), response parsing (reasoning, answer, tool
calls), the processor and the media it opens.

Imports ``generation`` (the cards' thinking defaults) and ``model`` (presets, checkpoint files), and what they import.
"""
