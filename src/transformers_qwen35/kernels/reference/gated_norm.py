"""The Gated DeltaNet output norm: RMSNorm per value head, then a SiLU gate ("norm before gate").

Plain weight (not ``1 + w``, unlike the other Qwen3.5 norms). Normalised in fp32, cast to the activation dtype
before the weight, gated in fp32, cast once more: the rounding of built-in transformers' torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    normed = weight * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)).to(dtype)
    # The product lands in the fresh SiLU output (same values, one full-size allocation fewer; autograd keeps a copy
    # where it needs one).
    return F.silu(gate.float()).mul_(normed).to(dtype)
