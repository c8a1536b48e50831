"""Weights packed for CPU decoding (kernels/cpu_linear.py, model/cpu_weights.py): the packed bf16 layer gives F.linear's
results; the int8 / int4 layers give the product with the weight their quantisation stands for (dequantised here
independently), that weight is within half a step of the original, and a packed model decodes as the unpacked one
(bf16: the same tokens) or close to it (int8 / int4, bounds below). Bad uses are refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformers_qwen35 import Qwen3_5ForCausalLM, pack_for_cpu
from transformers_qwen35.kernels.cpu_linear import (
    INT4_GROUP,
    INT8_DEQUANTIZE_ROWS,
    PackedLinear,
    bf16_packing_supported,
    can_pack,
    quantize_int4,
    quantize_int8,
)
from transformers_qwen35.model.presets import tiny_config

needs_bf16 = pytest.mark.skipif(not bf16_packing_supported(), reason="this CPU has no native bf16 products")


def linear(rows=96, columns=128, bias=False, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(columns, rows, bias=bias, dtype=torch.bfloat16)
    if bias:
        nn.init.normal_(layer.bias)
    return layer


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_bf16
@pytest.mark.parametrize("shape", [(1, 128), (2, 5, 128), (300, 128)])
def test_packed_bf16_is_f_linear(shape):
    layer = linear(bias=True)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    out = PackedLinear(layer, "bf16")(x)
    assert out.shape == (*shape[:-1], 96)
    assert relative(out, F.linear(x, layer.weight, layer.bias)) < 1e-6


def test_int8_weight_is_within_half_a_step_and_the_product_uses_it():
    layer = linear(bias=True)
    q, scale = quantize_int8(layer.weight)
    weight = layer.weight.float()
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127  # each row's largest weight maps to +-127
    assert bool(((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all())
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    out = PackedLinear(layer, "int8")(x)
    scale_used = scale.to(torch.bfloat16).float()  # the kernel reads the bf16 scales
    expected = x.float() @ (q.float() * scale_used[:, None]).t() + layer.bias.float()
    assert out.shape == (3, 7, 96) and out.dtype == torch.bfloat16
    assert relative(out, expected) < 1e-2  # bf16 output rounding
    assert relative(out, F.linear(x.float(), weight, layer.bias.float())) < 2e-2
    prompt = torch.randn(INT8_DEQUANTIZE_ROWS + 3, 128, dtype=torch.bfloat16)  # the GEMM path for many rows
    expected = prompt.float() @ (q.float() * scale_used[:, None]).t() + layer.bias.float()
    assert relative(PackedLinear(layer, "int8")(prompt), expected) < 1e-2


def test_int4_weight_is_within_half_a_step_and_the_product_uses_it():
    layer = linear()
    q, scale, zero = quantize_int4(layer.weight)
    assert q.min() >= 0 and q.max() <= 15 and scale.shape == (96, 128 // INT4_GROUP)
    weight = layer.weight.float()
    step = scale.repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((dequantize_int4(q, scale, zero) - weight).abs() <= step / 2 + 1e-6).all())
    # Independently of dequantize_int4: a group's smallest weight is q = 0, its largest q = 15.
    grouped = weight.reshape(96, -1, INT4_GROUP)
    assert torch.equal(q.reshape(96, -1, INT4_GROUP).gather(-1, grouped.argmin(-1, keepdim=True)).flatten().unique(),
                       torch.tensor([0], dtype=torch.int32))  # fmt: skip
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    out = PackedLinear(layer, "int4")(x)
    s16, z16 = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()  # the kernel reads bf16 scales
    expected = x.float() @ dequantize_int4(q, s16, z16).t()
    assert relative(out, expected) < 1e-2
    assert relative(out, F.linear(x.float(), weight)) < 0.15  # 4 bits: about 1/30 of a group's range per weight


def test_int4_takes_only_the_shapes_its_kernel_packs():
    assert can_pack(linear(rows=96, columns=128), "int4")
    assert not can_pack(linear(rows=100, columns=128), "int4")  # outputs: multiples of 16
    assert not can_pack(linear(rows=96, columns=48), "int4")  # inputs: whole groups of 32
    with pytest.raises(ValueError, match="cannot pack"):
        PackedLinear(linear(rows=100), "int4")


def test_packed_layers_take_bf16_cpu_inputs_only():
    layer = PackedLinear(linear(), "int8")
    with pytest.raises(ValueError, match="bf16 inputs"):
        layer(torch.randn(1, 128))
    with pytest.raises(ValueError, match="one of"):
        PackedLinear(linear(), "int3")


def dequantize_int4(q, scale, zero):
    """The weight the tinygemm layout stands for, ``(q - 8) * s + z`` per group (written here, not imported)."""
    group = q.shape[1] // scale.shape[1]
    return (q.float() - 8) * scale.repeat_interleave(group, dim=1) + zero.repeat_interleave(group, dim=1)


def tiny_model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=512).text_config
    return Qwen3_5ForCausalLM(config).to(dtype).eval()


def greedy(model, ids, new=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, ids.shape[1] :]


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_a_packed_model_decodes_as_the_unpacked_one(weights):
    if weights == "bf16" and not bf16_packing_supported():
        pytest.skip("this CPU has no native bf16 products")
    reference_fp32 = tiny_model(torch.float32)
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    linear_layers = sum(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        fp32_logits = reference_fp32(ids).logits
        bf16_logits = model(ids).logits
        tokens = greedy(model, ids)
        pack_for_cpu(model, weights)
        packed_logits = model(ids).logits
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    left = [m for m in model.modules() if type(m) is nn.Linear]
    assert model.lm_head in packed and len(packed) + len(left) == linear_layers
    assert all(not can_pack(m, weights) for m in left)  # int4 leaves DeltaNet's narrow gate projections
    assert len(left) == (0 if weights != "int4" else 2 * model.config.layer_types.count("linear_attention"))
    error = relative(packed_logits, fp32_logits)
    if weights == "bf16":
        assert relative(packed_logits, bf16_logits) < 1e-6
        assert torch.equal(greedy(model, ids), tokens)
    else:
        # Measured against fp32 on this random model: bf16 6.6e-3, int8 1.1e-2, int4 0.105; bounds about twice those.
        bound = {"int8": 3e-2, "int4": 0.2}[weights]
        assert error < bound, (weights, error, relative(bf16_logits, fp32_logits))


def test_packing_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="bfloat16 model on the CPU"):
        pack_for_cpu(tiny_model(torch.float32), "int8")
    model = pack_for_cpu(tiny_model(), "int8")
    with pytest.raises(ValueError, match="already packed as int8"):
        pack_for_cpu(model, "int4")
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="one of"):
        pack_for_cpu(tiny_model(), "fp8")


def test_mtp_drafts_run_on_a_packed_model(tmp_path):
    """The MTP head shares the packed output head: greedy output stays that of plain decoding on the packed model."""
    from transformers import AutoModelForCausalLM

    from transformers_qwen35.cli.demo import build_demo_checkpoint

    model = AutoModelForCausalLM.from_pretrained(build_demo_checkpoint(tmp_path), dtype=torch.bfloat16).eval()
    pack_for_cpu(model, "int8")
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=10, do_sample=False)
        drafted = model.generate(ids, max_new_tokens=10, do_sample=False, mtp_draft_tokens=2)
    assert torch.equal(drafted, plain)


def test_a_packed_model_decodes_on_the_static_loop_by_default():
    """generate() on a packed CPU model takes the static loop (its kept cache shows it) with the dynamic loop's tokens;
    what the static loop does not serve (beam search) keeps transformers' loop."""
    from transformers_qwen35.generation.static_decode import _CACHES, release_static_cache

    model = pack_for_cpu(tiny_model(), "int8")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dynamic = model.generate(
            ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="dynamic"
        )
        assert model not in _CACHES
        default = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert model in _CACHES
        release_static_cache(model)
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=2)
        assert model not in _CACHES
    assert torch.equal(default, dynamic)
    unpacked = tiny_model()
    with torch.no_grad():
        unpacked.generate(ids, max_new_tokens=3, do_sample=False)
    assert unpacked not in _CACHES  # an unpacked CPU model keeps transformers' loop


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantising_in_row_blocks_packs_what_one_block_would(monkeypatch, weights):
    """Large layers are quantised a block of rows at a time (bounded temporaries); the packed layer is the same."""
    from transformers_qwen35.kernels import cpu_linear

    layer = linear(rows=192)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    whole = PackedLinear(layer, weights)
    monkeypatch.setattr(cpu_linear, "QUANTIZE_ROWS", 64)
    blocks = PackedLinear(layer, weights)
    for name, buffer in whole.named_buffers():
        assert torch.equal(dict(blocks.named_buffers())[name], buffer), name
    assert torch.equal(blocks(x), whole(x))
