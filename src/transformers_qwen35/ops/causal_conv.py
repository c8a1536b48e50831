"""Short causal depthwise convolution + SiLU in plain PyTorch (the Gated DeltaNet's width-4 conv).

``y[c, t] = SiLU(sum_k w[c, k] * x[c, t - (K - 1) + k])``: ``w[:, K - 1]`` multiplies the current token. Inputs
before the sequence start come from the cache (the last ``K - 1`` of its ``K`` columns) or are zero.

The cache keeps ``K`` columns, channels-first ``(B, D, K)``, the layout of transformers' and fla's conv state.
For packed sequences every tap that would reach across a segment start is dropped, so no sample sees another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, conv_state=None, position_in_segment=None):
    """``x`` ``(B, T, D)``; ``weight`` ``(D, K)``; ``conv_state`` ``(B, D, K)`` or None; ``position_in_segment``
    ``(B, T)`` (0 at each packed segment's first token) or None. Returns ``(y (B, T, D), new state (B, D, K))``."""
    batch, length, dim = x.shape
    width = weight.shape[-1]
    inputs = x.transpose(1, 2)
    if conv_state is None and position_in_segment is None:
        # A fresh prompt: let the convolution pad on the left instead of concatenating zeros (one copy fewer).
        out = F.conv1d(inputs, weight.unsqueeze(1), groups=dim, padding=width - 1)[..., :length]
        new_state = inputs[..., -width:].contiguous() if length >= width else F.pad(inputs, (width - length, 0))
        return F.silu(out).transpose(1, 2), new_state
    if conv_state is None:
        left = inputs.new_zeros(batch, dim, width - 1)
    else:
        left = conv_state[..., 1:].to(inputs.dtype)
    padded = torch.cat([left, inputs], dim=-1)  # (B, D, T + K - 1)
    if position_in_segment is None:
        out = F.conv1d(padded, weight.unsqueeze(1), groups=dim)
    else:
        out = torch.zeros_like(inputs)
        for k in range(width):
            reach = width - 1 - k  # how many tokens back this tap looks
            keep = (position_in_segment >= reach).to(inputs.dtype)[:, None, :]
            out = out + weight[:, k, None] * padded[..., k : k + length] * keep
    # A copy, not a view: the cache must not keep the whole prompt's activations alive.
    new_state = (
        padded[..., -width:].contiguous() if padded.shape[-1] >= width else F.pad(padded, (width - padded.shape[-1], 0))
    )
    return F.silu(out).transpose(1, 2), new_state
