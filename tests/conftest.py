"""Shared builders: tiny configs and a built-in transformers twin with identical weights (the oracle)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("TRANSFORMERS_QWEN35_KERNELS", "auto")

import transformers_qwen35  # noqa: E402,F401  (registers the package)


def _point_builtin_oracle_at_its_pytorch_ops() -> None:
    """On a CPU-only machine with triton installed, built-in transformers binds fla's Triton kernels at import and
    every forward fails with "0 active drivers" (kernels-and-traps.md §8.1). Our package survives that; the oracle
    does not, so there it runs the PyTorch references it uses when fla is absent (the same math)."""
    import importlib.util
    import inspect

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    from transformers.models.qwen3_5 import modeling_qwen3_5

    for name in (
        "torch_chunk_gated_delta_rule",
        "torch_recurrent_gated_delta_rule",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    ):
        if hasattr(modeling_qwen3_5, name):
            setattr(modeling_qwen3_5, name, inspect.unwrap(getattr(modeling_qwen3_5, name)))


_point_builtin_oracle_at_its_pytorch_ops()
from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5TextConfig  # noqa: E402

ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}

# value heads equal to and double the key heads, tied and untied, a conv of width 4 and of width 2
TINY_CONFIGS = {
    "gva1-tied": dict(linear_num_key_heads=4, linear_num_value_heads=4, tie_word_embeddings=True),
    "gva2-untied": dict(linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False),
    "gva2-conv2-tied": dict(
        linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=True, linear_conv_kernel_dim=2
    ),
}


def tiny_text_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return kwargs


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return float(
        (ours.detach().double() - reference.double()).abs().max()
        / reference.detach().double().abs().max().clamp_min(1e-30)
    )


def perturbed_state(model, tied_embedding: str | None) -> dict:
    """The model's weights plus noise (so zero-initialised norms matter), with moderate DeltaNet decays."""
    state = {name: value + 0.1 * torch.randn_like(value) for name, value in model.state_dict().items()}
    for name in state:
        if name.endswith("A_log"):
            # Moderate decays, as in trained checkpoints: with exp(A_log) near 16 the state forgets within a token,
            # gradients of the gate vanish to ~1e-8 and only rounding is left to compare.
            state[name] = torch.empty_like(state[name]).uniform_(0.3, 2.0).log()
    if tied_embedding is not None:
        state["lm_head.weight"] = state[tied_embedding]
    return state


def build_pair(seed: int = 0, attn_implementation: str = "eager", **overrides):
    """(ours, built-in) text causal LMs with identical, non-trivial weights, in eval mode, fp32."""
    from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

    kwargs = tiny_text_kwargs(**overrides)
    torch.manual_seed(seed)
    ours = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**kwargs, attn_implementation=attn_implementation))
    native = modeling_qwen3_5.Qwen3_5ForCausalLM(
        configuration_qwen3_5.Qwen3_5TextConfig(**kwargs, attn_implementation=attn_implementation)
    )
    state = perturbed_state(ours, tied_embedding="model.embed_tokens.weight" if kwargs["tie_word_embeddings"] else None)
    ours.load_state_dict(state)
    native.load_state_dict(state)
    return ours.eval(), native.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def pair(request):
    return build_pair(**TINY_CONFIGS[request.param])


# --- multimodal -------------------------------------------------------------------------------------------------

VOCAB = 99
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1


def tiny_composite_dict(**text_overrides) -> dict:
    """A composite config dict: the tiny text stack, a one-block vision tower, placeholders at the vocab's top."""
    return dict(
        text_config=tiny_text_kwargs(**text_overrides),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
            patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh",
        ),
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        tie_word_embeddings=text_overrides.get("tie_word_embeddings", False),
    )  # fmt: skip


def build_vl_pair(seed: int = 0, attn_implementation: str = "eager", **text_overrides):
    """(ours, built-in) Qwen3_5ForConditionalGeneration with identical, non-trivial weights, eval mode, fp32."""
    from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

    from transformers_qwen35 import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = tiny_composite_dict(**text_overrides)
    torch.manual_seed(seed)
    ours = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**config, attn_implementation=attn_implementation))
    native_config = configuration_qwen3_5.Qwen3_5Config(**config)
    native_config._attn_implementation = attn_implementation
    native_config.text_config._attn_implementation = attn_implementation
    native_config.vision_config._attn_implementation = attn_implementation
    native = modeling_qwen3_5.Qwen3_5ForConditionalGeneration(native_config)
    tied = "model.language_model.embed_tokens.weight" if config["tie_word_embeddings"] else None
    state = perturbed_state(ours, tied_embedding=tied)
    ours.load_state_dict(state)
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in name for name in missing), (missing, unexpected)
    return ours.eval(), native.eval()


def vision_run(tokens: int, pad: int) -> list[int]:
    return [VISION_START] + [pad] * tokens + [VISION_END]


def random_pixels(grid_thw: list[list[int]], seed: int = 0) -> torch.Tensor:
    patches = sum(t * h * w for t, h, w in grid_thw)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(patches, 3 * 2 * 16 * 16, generator=generator)


def install_fake_fla(monkeypatch, impl):
    """Put a fake `fla` package in sys.modules whose kernels call `impl` (a dict of callables)."""
    import sys
    import types

    from transformers_qwen35.kernels import dispatch as kernels

    kernels._load_fla.cache_clear()
    modules = {
        "fla": types.ModuleType("fla"),
        "fla.ops": types.ModuleType("fla.ops"),
        "fla.ops.gated_delta_rule": types.ModuleType("fla.ops.gated_delta_rule"),
        "fla.modules": types.ModuleType("fla.modules"),
        "fla.modules.causal_conv1d": types.ModuleType("fla.modules.causal_conv1d"),
        "fla.modules.norm": types.ModuleType("fla.modules.norm"),
        "fla.modules.norm.fused_norm_gate": types.ModuleType("fla.modules.norm.fused_norm_gate"),
        "fla.modules.norm.layernorm": types.ModuleType("fla.modules.norm.layernorm"),
        "fla.modules.activations": types.ModuleType("fla.modules.activations"),
    }
    modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = impl["chunk"]
    modules["fla.ops.gated_delta_rule"].fused_recurrent_gated_delta_rule = impl["recurrent"]
    modules["fla.modules.causal_conv1d"].causal_conv1d = impl["conv"]
    modules["fla.modules.causal_conv1d"].causal_conv1d_update = impl["conv_update"]
    modules["fla.modules.norm.fused_norm_gate"].rms_norm_gated = impl["norm"]
    if "rms_norm" in impl:
        modules["fla.modules.norm.layernorm"].rms_norm = impl["rms_norm"]
    if "swiglu" in impl:
        modules["fla.modules.activations"].swiglu = impl["swiglu"]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "_logged", set())


def install_exact_fake_fla(monkeypatch) -> list[tuple]:
    """A fake fla built on our exact PyTorch ops that checks each call's layout and arguments against fla-core 0.6's
    signatures; returns the list it appends ``(kernel, tokens, packed)`` to on every call."""
    from transformers_qwen35.kernels import dispatch as kernels
    from transformers_qwen35.kernels.reference.causal_conv import causal_conv1d
    from transformers_qwen35.kernels.reference.gated_delta_rule import (
        chunk_gated_delta_rule,
        recurrent_gated_delta_rule,
    )

    calls = []

    def gates(g, beta, use_gate_in_kernel=False, A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False):
        # fla 0.6: with use_gate_in_kernel, g is the raw input of -exp(A_log) * softplus(g + dt_bias), in fp32
        # (A_log, dt_bias of shape [HV]); with use_beta_sigmoid_in_kernel, beta is the raw input of a sigmoid.
        if use_gate_in_kernel:
            assert A_log is not None and A_log.shape == dt_bias.shape == g.shape[-1:]
            g = -A_log.float().exp() * torch.nn.functional.softplus(g.float() + dt_bias.float())
            calls.append(("gates in kernel", g.shape[1], False))
        if use_beta_sigmoid_in_kernel:
            beta = beta.float().sigmoid()
        assert g.dtype == torch.float32 and beta.shape == g.shape
        return g, beta

    def chunk(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
              cu_seqlens=None, **gate_options):  # fmt: skip
        assert use_qk_l2norm_in_kernel
        assert cu_seqlens is None or q.shape[0] == 1
        calls.append(("chunk", q.shape[1], cu_seqlens is not None))
        g, beta = gates(g, beta, **gate_options)
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)

    def recurrent(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
                  **gate_options):  # fmt: skip
        assert use_qk_l2norm_in_kernel and not torch.is_grad_enabled()  # fla's fused recurrent has no backward
        calls.append(("recurrent", q.shape[1], False))
        g, beta = gates(g, beta, **gate_options)
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, output_final_state)

    def conv(x, weight, initial_state=None, output_final_state=False, activation=None, cu_seqlens=None):
        assert activation == "silu" and x.dim() == 3 and weight.dim() == 2
        position = None
        if cu_seqlens is not None:
            starts = torch.zeros(x.shape[1], dtype=torch.bool)
            starts[cu_seqlens[:-1].long()] = True
            ids = starts.long().cumsum(0) - 1
            position = (torch.arange(x.shape[1]) - cu_seqlens[ids].long())[None]
        calls.append(("conv", x.shape[1], cu_seqlens is not None))
        y, state = causal_conv1d(x, weight, initial_state, position)
        return y, (state if output_final_state else None)

    def conv_update(x, cache, weight=None, activation=None):
        y, state = causal_conv1d(x, weight, cache)
        cache.copy_(state)
        return y, cache

    def norm(x, gate, weight, bias, activation="swish", eps=1e-5):
        assert activation == "silu" and eps == 1e-6
        return kernels.torch_gated_rms_norm(x, gate, weight, eps)

    def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
        # fla's LayerNormFunction with is_rms_norm: y = x * rstd * weight, in fp32, stored in x's dtype; with a
        # residual, x + residual in fp32 is normalised and (prenorm) returned too, in the residual's dtype
        assert bias is None and weight.shape == x.shape[-1:] and prenorm == (residual is not None)
        assert residual is None or residual.shape == x.shape
        calls.append(("rms_norm" if residual is None else "add_rms_norm", x.shape[-2] if x.dim() > 1 else 1, False))
        x32 = x.float() if residual is None else x.float() + residual.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        return y if residual is None else (y, x32.to(residual.dtype))

    def swiglu(x, y):
        # fla's SwiGLUFunction: silu(x) * y in fp32, stored in x's dtype
        assert x.shape == y.shape
        calls.append(("swiglu", x.shape[-2], False))
        return (torch.nn.functional.silu(x.float()) * y.float()).to(x.dtype)

    install_fake_fla(
        monkeypatch,
        dict(
            chunk=chunk, recurrent=recurrent, conv=conv, conv_update=conv_update, norm=norm, rms_norm=rms_norm,
            swiglu=swiglu,
        ),
    )  # fmt: skip
    return calls


# Operations that make the host wait for the device's values on CUDA: inside a capture they fail it.
HOST_SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten._unique2",
              "aten.unique_consecutive", "aten.repeat_interleave.Tensor", "aten.equal", "aten.is_nonzero")  # fmt: skip


class HostSyncs(TorchDispatchMode):
    """Within the block, records every operation that would read a tensor's value on the host (``found``)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_SYNCS):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def write_untied_tiny_checkpoint(directory, seed: int, vocab_size: int = 1024):
    """A tiny official-layout checkpoint (MTP head included) with an untied head: with tied random embeddings greedy
    decoding repeats one token forever, which would make generation tests trivial."""
    from transformers_qwen35.model.checkpoint import write_random_checkpoint
    from transformers_qwen35.model.presets import tiny_config

    config = tiny_config(vocab_size=vocab_size)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    return write_random_checkpoint(directory, config, seed=seed)


def left_padded_prompts(batch: int = 3, length: int = 9, seed: int = 0, vocab_size: int = 1024):
    """Random prompts (below the 4 multimodal placeholder ids of ``tiny_config``), left-padded so that row ``b``
    loses ``2 b`` leading tokens; returns ``(input_ids, attention_mask)``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 4, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask


def generate_tokens(model, ids, mask, **kwargs):
    """The decoding tests' ``generate()``: greedy, 14 new tokens, pad id 0, without autograd, unless told otherwise."""
    kwargs.setdefault("max_new_tokens", 14)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kwargs)
