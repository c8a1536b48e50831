"""Qwen3.5's RMSNorm: zero-centred weight, ``x_hat * (1 + w)`` computed in fp32 and cast back to the input's dtype
(as built-in transformers computes it)."""

from __future__ import annotations

import torch


def zero_centred_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.mul_(1.0 + weight.float()).type_as(x)  # in place: one full-size allocation fewer
