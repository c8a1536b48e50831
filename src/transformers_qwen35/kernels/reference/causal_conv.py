"""Short causal depthwise convolution + SiLU in plain PyTorch (the Gated DeltaNet's width-4 conv).

``y[c, t] = SiLU(sum_k w[c, k] * x[c, t - (K - 1) + k])``: ``w[:, K - 1]`` multiplies the current token. Inputs
before the sequence start come from the cache (the last ``K - 1`` of its ``K`` columns) or are zero.

The cache keeps ``K`` columns, channels-first ``(B, D, K)``, the layout of transformers' and fla's conv state.
For packed sequences every tap that would reach across a segment start is dropped, so no sample sees another.

Computed as ``K`` shifted multiply-adds over the token-major input rather than with ``F.conv1d``: on CPU oneDNN's
depthwise convolution is several times slower for this shape (4 taps, thousands of channels), and the result comes out
token-major, the layout the q/k/v split reads. Sums run in fp32, oldest tap first, and are rounded to the input dtype
before the SiLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, conv_state=None, position_in_segment=None):
    """``x`` ``(B, T, D)``; ``weight`` ``(D, K)``; ``conv_state`` ``(B, D, K)`` or None; ``position_in_segment``
    ``(B, T)`` (0 at each packed segment's first token) or None. Returns ``(y (B, T, D), new state (B, D, K))``."""
    length = x.shape[1]
    width = weight.shape[-1]
    # (K, D) in fp32: each tap's weights contiguous, so the products below vectorise over channels.
    taps = weight.t().float().contiguous()
    if conv_state is None:
        history, context = x, 0  # no left context: the taps that would reach before the start are skipped (zeros)
    else:
        history = torch.cat([conv_state[..., 1:].transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K - 1 + T, D)
        context = width - 1

    # Oldest tap first, the order in which F.conv1d sums on CPU, so both round alike (bit-identical in fp32).
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for reach in range(width - 1, -1, -1):  # how many tokens back the tap looks
        first = max(reach - context, 0)  # the first output that has a token (or cached column) that far back
        if first >= length:
            continue
        source = history[:, context + first - reach : context + length - reach]
        if position_in_segment is not None and reach:
            source = source * (position_in_segment[:, first:, None] >= reach)  # not across a segment start
        out[:, first:].addcmul_(source, taps[width - 1 - reach])
    y = F.silu(out.to(x.dtype), inplace=True)

    # A copy, not a view: the cache must not keep the whole prompt's activations alive.
    tail = history[:, -width:]
    if tail.shape[1] < width:
        tail = F.pad(tail, (0, 0, width - tail.shape[1], 0))
    return y, tail.transpose(1, 2).contiguous()
