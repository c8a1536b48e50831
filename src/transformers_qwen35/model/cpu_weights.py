"""Packing a loaded model's language-model weights for decoding on a CPU (``kernels/cpu_linear.py``).

``pack_for_cpu(model, "bf16" | "int8" | "int4")`` replaces, in place, every linear layer of the language model and
its output head with a ``PackedLinear``: the bf16 weights in oneDNN's layout (same results as before, faster
matrix-vector products), or quantised to 8 or 4 bits. The vision tower keeps its layers (it runs once per image, not
once per token), as do the layers the int4 kernel cannot take. The embedding stays a bf16 table: the output head,
tied to it in the small checkpoints, gets its own packed copy.

Inference only: a packed model trains nothing and refuses ``save_pretrained`` (save the checkpoint you loaded).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.cpu_linear import FORMATS, PackedLinear, bf16_packing_supported, can_pack


def pack_for_cpu(model: nn.Module, weights: str) -> nn.Module:
    """Pack ``model``'s language-model linear layers as ``weights`` (bf16, int8 or int4); returns ``model``."""
    if weights not in FORMATS:
        raise ValueError(f"weights must be one of {', '.join(FORMATS)}, got {weights!r}")
    if getattr(model, "cpu_weights", None) is not None:
        raise ValueError(f"this model is already packed as {model.cpu_weights}: load the checkpoint again to repack")
    parameter = model.get_input_embeddings().weight
    if parameter.device.type != "cpu" or parameter.dtype != torch.bfloat16:
        raise ValueError(
            f"packing for CPU decoding needs a bfloat16 model on the CPU, got {parameter.dtype} on "
            f"{parameter.device}: load it with from_pretrained(..., dtype=torch.bfloat16) and do not move it"
        )
    if weights == "bf16" and not bf16_packing_supported():
        raise ValueError(
            "this CPU (or PyTorch build) has no native bf16 matrix products (AVX512-BF16 or AMX), so packed bf16 "
            "would be slower than float32: load the model in float32, or quantise it to int8 / int4"
        )
    for name, module in list(model.named_modules()):
        if ".visual" in f".{name}" or isinstance(module, PackedLinear):
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and can_pack(child, weights):
                setattr(module, child_name, PackedLinear(child, weights))
    model.cpu_weights = weights
    return model
