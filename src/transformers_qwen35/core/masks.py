"""The attention mask of the full-attention layers, and the name transformers gives the cache in model outputs.

Both the text model's forward and the speculative decoding loop (which verifies a block of drafted tokens against a
cache) build the same mask; it lives here, below both, so the decoding loop never imports the modeling code.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed the output/input field `past_key_values` to `cache` in late 5.x.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def build_attention_mask(key_valid, segments, batch, length, past, device, needs_causal_mask):
    """Boolean ``(B, 1, T, past + T)`` mask (True = may attend), or None when the kernel's own causal flag is exact
    (SDPA's ``is_causal`` aligns queries to the top left, so it is exact only without a cache).

    ``key_valid``: ``(B, past + T)`` booleans (False on padding) or None; ``segments``: packed samples
    (``model/packing.py``'s ``Segments``: attention stays within a sample) or None."""
    if key_valid is None and segments is None and (length == 1 or (past == 0 and not needs_causal_mask)):
        return None
    query_pos = torch.arange(past, past + length, device=device)
    key_pos = torch.arange(past + length, device=device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None].expand(batch, -1, -1)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if segments is not None:
        ids = segments.segment_ids
        allowed = allowed & (ids[:, :, None] == ids[:, None, :])
    # A query with nothing to attend to (a left pad) would give NaNs; let it see itself instead.
    lonely = ~allowed.any(-1, keepdim=True)
    diagonal = key_pos[None, None, :] == query_pos[None, :, None]
    allowed = allowed | (lonely & diagonal)
    return allowed[:, None]
