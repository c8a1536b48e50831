"""Linear layers for decoding on a CPU: the weight packed once, the products on PyTorch's own CPU kernels.

Why: decoding multiplies one vector per row by every weight matrix, so on a CPU a token costs the time to stream all
weights from memory once. How fast that streaming goes depends on the kernel and the weight's layout (2-core Xeon with
AVX512-BF16 and AMX, torch 2.13, the 0.8B model's output head, 248,320 x 1,024, one row):

=====================================================  ========  =======================
``F.linear``, bf16 weight as stored                    44 ms     12 GB/s
the same bf16 weight in oneDNN's packed layout         25 ms     20 GB/s (same products)
``F.linear``, fp32 weight                              39 ms     26 GB/s, but twice the bytes
int8 per channel, ``aten._weight_int8pack_mm``         24 ms
int4 groups of 32, ``aten._weight_int4pack_mm_for_cpu`` 11 ms
torchao 0.18 ``Int8WeightOnlyConfig``, eager            288 ms    (dequantises the whole weight every call)
=====================================================  ========  =======================

torchao's CPU int4 layout is a prototype in 0.18 and its int8 weight-only layer only pays off under ``torch.compile``
(a minute of compilation at 0.8B before the first token), so this module is the few lines that put ATen's kernels
behind ``nn.Linear``'s interface; the kernels themselves are PyTorch's.

Formats (``PackedLinear.weights``):

* ``bf16``: the bf16 weight reordered by oneDNN (what inductor's freezing pass does to linear layers): the products of
  ``F.linear`` on the same weight, with fp32 accumulation; results equal up to summation order.
* ``int8``: symmetric per output channel, ``w ~ q * s`` with ``q`` in [-127, 127] and ``s = max|w_row| / 127``.
* ``int4``: asymmetric in groups of ``INT4_GROUP`` inputs (the tinygemm layout): ``w ~ (q - 8) * s + z`` with ``q`` in
  [0, 15], ``s = (max - min) / 15`` and ``z = min + 8 s`` per group; 5 bits a weight with the bf16 scale and offset.

All three take and return bf16 activations (the quantised kernels are fast only for those). Packed layers are for
inference: they hold no ``weight`` parameter, train nothing, and a model holding them refuses ``save_pretrained``.

Under ``torch.compile`` (compiled CPU decoding, ``generation/compiled_step.py``) the int8 and int4 products go to
inductor as they are (it has lowerings for both); the packed bf16 product goes as ``packed_bf16_linear``, an opaque
custom op, because inductor's lowering of oneDNN's product only takes weights it packed itself (graph constants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("bf16", "int8", "int4")
INT4_GROUP = 32
# The int4 packing wants output sizes in multiples of 16; smaller or odd layers stay as they are.
INT4_ROWS_MULTIPLE = 16
# From this many input rows on (a prompt, not a decoding step) the int8 kernel, which streams the weight once per row,
# loses to one bf16 copy of the weight and a bf16 matrix product (3584 x 1024, 2 cores: 7.2 vs 1.7 ms at 128 rows,
# 1.8 vs 1.4 ms at 32, 0.9 vs 1.3 ms at 16).
INT8_DEQUANTIZE_ROWS = 32
# Quantisation works through this many output rows at a time, so that its fp32 temporaries stay small next to the
# weight (9B's output head, 248,320 x 4,096, would otherwise need ~12 GB of them; loading 0.8B and packing it as int4
# peaked at 5.3 GB of memory in one block, 2.5 GB in blocks). A multiple of 64: the int4 packing of row blocks
# concatenates to the whole's (tested).
QUANTIZE_ROWS = 8192


@torch.library.custom_op("transformers_qwen35::packed_bf16_linear", mutates_args=())
def packed_bf16_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """oneDNN's product of ``x`` with a weight packed by ``_reorder_linear_weight``, as one op a compiler keeps whole."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_bf16_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def bf16_packing_supported() -> bool:
    """Whether this CPU and PyTorch build run oneDNN's packed bf16 products natively (AVX512-BF16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 (N, K), s (N,))`` with ``weight ~ q * s[:, None]``, per output channel, symmetric."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q int32 (N, K) in [0, 15], s (N, K / group), z (N, K / group))`` with ``weight ~ (q - 8) * s + z``."""
    rows, columns = weight.shape
    grouped = weight.float().reshape(rows, columns // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15)
    zero = low + 8 * scale
    return q.reshape(rows, columns).to(torch.int32), scale, zero


def can_pack(linear: nn.Linear, weights: str) -> bool:
    """Whether ``linear`` fits ``weights``' kernel (int4: inputs a multiple of the group, outputs of 16)."""
    if weights == "int4":
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % INT4_ROWS_MULTIPLE == 0
    return True


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward over a packed bf16, int8 or int4 weight (see the module's docstring)."""

    def __init__(self, linear: nn.Linear, weights: str):
        super().__init__()
        if weights not in FORMATS:
            raise ValueError(f"weights must be one of {FORMATS}, got {weights!r}")
        if not can_pack(linear, weights):
            raise ValueError(f"{weights} cannot pack a {linear.out_features} x {linear.in_features} linear layer")
        self.in_features, self.out_features, self.weights = linear.in_features, linear.out_features, weights
        weight = linear.weight.detach()
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        # Non-persistent: a packed layer never reaches a state dict (saving is refused, see the module docstring).
        self.register_buffer("bias", bias, persistent=False)
        if weights == "bf16":
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), 1)
            self.register_buffer("packed", packed, persistent=False)
        elif weights == "int8":
            blocks = [quantize_int8(rows) for rows in weight.split(QUANTIZE_ROWS)]
            self.register_buffer("packed", torch.cat([q for q, _ in blocks]), persistent=False)
            self.register_buffer("scale", torch.cat([s for _, s in blocks]).to(torch.bfloat16), persistent=False)
        else:
            packed, scale_and_zero = [], []
            for rows in weight.split(QUANTIZE_ROWS):
                q, scale, zero = quantize_int4(rows)
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
                # The kernel's layout: (K / group, N, 2), scale then offset.
                scale_and_zero.append(torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16))
            self.register_buffer("packed", torch.cat(packed), persistent=False)
            self.register_buffer("scale_and_zero", torch.cat(scale_and_zero, dim=1).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise ValueError(
                f"a {self.weights}-packed linear layer takes bf16 inputs on the CPU, got {x.dtype} on {x.device}: "
                "load the model with dtype=torch.bfloat16 and keep it on the CPU"
            )
        if self.weights == "bf16":
            if torch.compiler.is_compiling():
                return packed_bf16_linear(x, self.packed, self.bias, self.out_features)
            # Eagerly the op directly: the custom op's Python dispatch costs ~30 us a call, ~190 calls a token.
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        flat = x.reshape(-1, self.in_features).contiguous()
        if self.weights == "int8" and flat.shape[0] >= INT8_DEQUANTIZE_ROWS:
            # q is exact in bf16 and the scale applies per output: the kernel's product, computed as a GEMM.
            out = F.linear(flat, self.packed.to(torch.bfloat16)) * self.scale
        elif self.weights == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scale_and_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"
