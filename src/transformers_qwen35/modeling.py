"""The Qwen3.5 language model: Gated DeltaNet and gated full-attention layers, 3:1.

What is notable, in the order a token meets it:

* every RMSNorm is zero-centred (``x_hat * (1 + w)``) except the DeltaNet output norm, which has a plain weight;
* a DeltaNet layer projects to ``[Q | K | V]`` (flat, head-major), runs a width-4 causal depthwise conv + SiLU over
  time, then the gated delta rule with an fp32 state, a per-head RMSNorm gated by SiLU(z), and ``out_proj``;
* a full-attention layer's ``q_proj`` is twice as wide: per head ``[query; gate]`` interleaved. q and k get a
  zero-centred RMSNorm, then rotary embedding on their first 64 dims only, with the (T, H, W) position rows
  interleaved over the 32 frequency slots (multimodal RoPE; for text all three rows are equal). The attention output
  is multiplied by ``sigmoid(gate)`` before ``o_proj``;
* padded positions are zeroed before every DeltaNet layer, which makes left padding exact; packed samples are kept
  apart in every layer (see ``packing.py``).

Module attribute names are the checkpoint keys, so official weights load unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple

from . import kernels, training_graphs
from .cache import Qwen3_5HybridCache, model_state, returned_cache
from .checkpoint import CarriedTensors, check_checkpoint_tensors, local_checkpoint_directory
from .chunked_loss import causal_lm_loss
from .configuration import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3_5Config, Qwen3_5TextConfig
from .packing import Segments, find_segments

try:  # transformers >= 5.x keeps the initialisers that respect already-loaded weights here
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init

# Inputs of at most this many tokens (batch x length) run the decoder stack with deferred residual adds.
DEFER_RESIDUAL_TOKENS = 64

# transformers renamed the output/input field `past_key_values` to `cache` in late 5.x.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class Qwen3_5RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``x_hat * (1 + w)`` computed in fp32, weights initialised to 0; the kernel choice lives
    in ``kernels.py``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of ``x``; with ``residual``, ``(norm of residual + x, residual + x)``, fused where the kernels
        allow. (One ``forward``, not a second method: hooks on the module, FSDP's unsharding among them, run.)"""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Qwen3_5RMSNormGated(nn.Module):
    """The DeltaNet output norm (plain weight, SiLU gate); the kernel choice lives in ``kernels.py``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rms_norm(x, gate, self.weight, self.eps)


class Qwen3_5MLP(nn.Module):
    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Qwen3_5TextRotaryEmbedding(nn.Module):
    """cos/sin for the rotary slice, each frequency slot taking its angle from the T, H or W position row.

    RoPE scaling as in transformers' ``rope_parameters``: ``linear``, ``yarn``, ``llama3`` fix their frequencies once;
    ``dynamic`` (NTK) rescales them for inputs reaching past ``max_position_embeddings`` and ``longrope`` switches
    to its long factors past ``original_max_position_embeddings``. Built-in keeps the rescaled frequencies on the
    module between calls (a later, shorter input reuses them); here each forward derives its own from its positions,
    which gives built-in's numbers for one input or one generation and keeps a model shared by threads correct."""

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        # Frequencies are computed on first use, not stored as buffers: from_pretrained builds modules on the meta
        # device and does not refill non-persistent buffers.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_scaling = 1.0
        if self.rope_type == "dynamic":
            self.rescale_past = config.max_position_embeddings
        elif self.rope_type == "longrope":
            self.rescale_past = config.rope_parameters.get("original_max_position_embeddings")
            self.rescale_past = self.rescale_past or config.max_position_embeddings
        else:
            self.rescale_past = None  # fixed frequencies

    def _inverse_frequencies(self, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        config = self.config
        if self.rope_type == "default":
            dim = config.rotary_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
            return 1.0 / (config.rope_parameters["rope_theta"] ** exponents)
        inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device, seq_len=seq_len)
        return inv_freq.to(device)

    def _frequencies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            inv_freq = self._inverse_frequencies(device)
            # Slots 1, 4, 7... take the H row, slots 2, 5, 8... the W row, within their section; the rest take T.
            section = self.config.mrope_section
            axis = torch.zeros(inv_freq.shape[0], dtype=torch.long, device=device)
            for row in (1, 2):
                axis[row : 3 * section[row] : 3] = row
            self._tables[device] = (inv_freq.float(), axis)
        return self._tables[device]

    def _rescaled(self, inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The frequencies for an input whose positions reach past ``rescale_past`` (one host sync, only then)."""
        seq_len = int(position_ids.max()) + 1
        if seq_len <= self.rescale_past:
            return inv_freq
        if self.rope_type == "longrope":
            seq_len = self.rescale_past + 1  # the long factors, whatever the length
        return self._inverse_frequencies(inv_freq.device, seq_len=seq_len).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` ``(3, B, T)`` -> cos, sin ``(B, T, head_dim)`` in ``x``'s dtype, laid out for
        ``apply_partial_rotary``: over the rotary dims ``[cos, cos]`` and ``[-sin, sin]`` (the sign of
        rotate-half folded in), over the dims that pass through 1 and 0. Made once per forward for every layer."""
        inv_freq, axis = self._frequencies(x.device)
        if self.rescale_past is not None:
            inv_freq = self._rescaled(inv_freq, position_ids)
        positions = position_ids.to(x.device)[axis].float()  # (half, B, T)
        angles = positions.permute(1, 2, 0) * inv_freq
        cos = (angles.cos() * self.attention_scaling).to(x.dtype)
        sin = (angles.sin() * self.attention_scaling).to(x.dtype)
        passed = self.config.head_dim - 2 * angles.shape[-1]
        ones, zeros = cos.new_ones(*cos.shape[:2], passed), cos.new_zeros(*cos.shape[:2], passed)
        return torch.cat([cos, cos, ones], -1), torch.cat([-sin, sin, zeros], -1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE on the first ``rotary_dim`` dims of ``x`` ``(B, H, T, D)``; the rest pass through unchanged (times 1,
    plus 0). ``cos``, ``sin`` as the rotary embedding lays them out: ``x * cos + rotate_half(x) * sin`` with the
    sign inside ``sin``, in three kernels (a multiply, the halves swapped, a multiply-add)."""
    half = rotary_dim // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    swapped = torch.cat([x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], dim=-1)
    return (x * cos).addcmul_(swapped, sin)  # in place on the fresh product: one full-size tensor fewer


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention with grouped KV heads; ``attention_mask`` is boolean (True = may attend)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


class Qwen3_5Attention(nn.Module):
    """Gated full attention (GQA, q/k norms, partial multimodal RoPE, sigmoid output gate)."""

    is_causal = True

    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3_5RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3_5RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        # No name for the projection itself: once the query is normed and the gate copied out, it is freed.
        query, gate = (
            self.q_proj(hidden_states)
            .view(batch, length, self.num_heads, 2 * self.head_dim)
            .split(self.head_dim, dim=-1)
        )
        query = self.q_norm(query).transpose(1, 2)
        gate = gate.reshape(batch, length, -1)
        key = self.k_norm(self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        rotary_dim = self.config.rotary_dim
        query, key = apply_partial_rotary(query, cos, sin, rotary_dim), apply_partial_rotary(key, cos, sin, rotary_dim)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation or "eager"
        # get_interface (not indexing) also tells transformers that set_attn_implementation() may switch this model:
        # it looks for the call in the module source.
        attend = (
            eager_attention
            if implementation == "eager"
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        )
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch, length, -1) * torch.sigmoid(gate)
        return self.o_proj(output), weights


class Qwen3_5GatedDeltaNet(nn.Module):
    """Gated DeltaNet linear attention. Parameters per layer: ``in_proj_qkv`` (h -> 2*H_k*d_k + H_v*d_v),
    ``in_proj_z`` (h -> H_v*d_v), ``in_proj_b`` / ``in_proj_a`` (h -> H_v), a depthwise ``conv1d`` of width K,
    ``A_log`` and ``dt_bias`` (H_v), the output ``norm`` (d_v) and ``out_proj`` (H_v*d_v -> h). No biases."""

    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim

        self.in_proj_qkv = nn.Linear(config.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        # Only its weight is used (by the conv kernel); kept as a Conv1d for the checkpoint's [D, 1, K] layout.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False,
            padding=self.conv_kernel_size - 1,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = Qwen3_5RMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, padding_mask=None, segments: Segments | None = None, cache=None):
        batch, length, _ = hidden_states.shape
        if padding_mask is not None:
            # Zeroed inputs give zero keys, so the state ignores pads: this is what makes left padding exact.
            hidden_states = hidden_states.masked_fill(~padding_mask[..., None], 0.0)
        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        recurrent_state = cache.recurrent_states[self.layer_idx] if cache is not None else None

        mixed = self.in_proj_qkv(hidden_states)
        # The gates' projections: kernels.decay_and_beta turns them into the decay and beta (on fla, its kernels do).
        b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)

        cu_seqlens = position_in_segment = None
        if segments is not None:
            # Packed: one flat row, boundaries handed to the conv and the recurrence alike.
            mixed, b, a = (t.reshape(1, batch * length, *t.shape[2:]) for t in (mixed, b, a))
            cu_seqlens = segments.cu_seqlens
            position_in_segment = segments.position_in_segment.reshape(1, -1)
        # Speculative verification records the conv's input; otherwise let it go once convolved: at 64k tokens
        # it is ~0.8 GB (0.8B) that would stay alive through the recurrence.
        conv_input = mixed if cache is not None and cache.speculating else None
        mixed, new_conv_state = kernels.causal_conv1d(
            mixed,
            self.conv1d.weight.squeeze(1),
            conv_state,
            cu_seqlens=cu_seqlens,
            position_in_segment=position_in_segment,
            need_state=cache is not None,
        )
        query, key, value = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        rows, tokens = mixed.shape[:2]
        query = query.reshape(rows, tokens, self.num_k_heads, self.head_k_dim)
        key = key.reshape(rows, tokens, self.num_k_heads, self.head_k_dim)
        value = value.reshape(rows, tokens, self.num_v_heads, self.head_v_dim)

        output, new_recurrent_state = kernels.gated_delta_rule(
            query, key, value, a, b, self.A_log, self.dt_bias, recurrent_state, cache is not None, cu_seqlens
        )
        if cache is not None and cache.speculating:
            # Speculative verification: keep what it takes to stop the states after any prefix of these tokens.
            cache.record_linear_step(
                self.layer_idx, conv_state, recurrent_state, conv_input, query, key, value, a, b, self.A_log,
                self.dt_bias,
            )  # fmt: skip
        if cache is not None:
            cache.conv_states[self.layer_idx] = new_conv_state
            cache.recurrent_states[self.layer_idx] = new_recurrent_state

        # The output gate's projection only now: made before the recurrence it would sit through it (268 MB at a
        # 64k-token prefill of 0.8B, where the recurrence sets the peak).
        z = self.in_proj_z(hidden_states).view(batch, length, self.num_v_heads, self.head_v_dim)
        output = self.norm(output.reshape(batch, length, self.num_v_heads, self.head_v_dim), z)
        return self.out_proj(output.reshape(batch, length, self.value_dim))


class Qwen3_5DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Qwen3_5TextConfig, layer_idx: int, layer_type: str | None = None):
        """``layer_type`` defaults to ``config.layer_types[layer_idx]``; the MTP head passes its own."""
        super().__init__()
        self.layer_type = layer_type or config.layer_types[layer_idx]
        if self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = Qwen3_5GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Qwen3_5Attention(config, layer_idx)
        self.mlp = Qwen3_5MLP(config)
        self.input_layernorm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        padding_mask=None,
        segments=None,
        cache=None,
        mlp_output=None,
        defer_mlp_output=False,
        **kwargs,
    ):
        """Returns ``(hidden_states, attention weights or None)``. Deferred residual add: with ``mlp_output`` (the
        previous layer's, not yet added) the layer's input is ``hidden_states + mlp_output``, summed inside its first
        norm's kernel; with ``defer_mlp_output`` it returns ``(hidden_states, mlp_output)`` the same way in place of
        ``hidden_states``. A whole decoder stack then runs one residual add fewer per layer."""
        if mlp_output is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(mlp_output, residual=hidden_states)
        weights = None
        if self.layer_type == LINEAR_ATTENTION:
            hidden_states = self.linear_attn(hidden_states, padding_mask=padding_mask, segments=segments, cache=cache)
        else:
            hidden_states, weights = self.self_attn(
                hidden_states, position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
            )
        normed, hidden_states = self.post_attention_layernorm(hidden_states, residual=residual)
        mlp_output = self.mlp(normed)
        if defer_mlp_output:
            return (hidden_states, mlp_output), weights
        return hidden_states + mlp_output, weights


class Qwen3_5PreTrainedModel(PreTrainedModel):
    config: Qwen3_5Config
    config_class = Qwen3_5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"^mtp\.", r"^model\.visual\."]
    # The official files store these two in fp32; keeping them so also saves them unchanged.
    _keep_in_fp32_modules_strict = ["A_log", "linear_attn.norm"]
    _is_stateful = True

    carried_tensors: CarriedTensors | None = None
    # Whether from_pretrained keeps the checkpoint tensors this class does not use (vision tower, MTP head) to write
    # them back on save: yes for the language models, no for the classification heads.
    carries_checkpoint_extras: bool = True
    # Positions per chunk of the chunked training loss (chunked_loss.py); None: as many as keep a chunk's fp32
    # logits within chunked_loss.CHUNK_ELEMENTS.
    loss_chunk_size: int | None = None
    # What forward's skip_logits=None means in training with labels. Set False for a trainer that reads
    # outputs.logits in training. (TRL 1.16's SFTTrainer computes its loss from the hidden states itself.)
    skip_logits_in_training: bool = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if pretrained_model_name_or_path is not None:
            cls._check_weights_fit_config(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        if not cls.carries_checkpoint_extras:
            return loaded
        # With no path (weights given as state_dict=) there are no checkpoint files to carry.
        if pretrained_model_name_or_path is not None:
            if model.config.model_type == "qwen3_5_text":
                # Vision tower, MTP head and composite config are not used here, but saving writes them back.
                model.carried_tensors = CarriedTensors.from_checkpoint(pretrained_model_name_or_path, kwargs)
            else:
                model.carried_tensors = CarriedTensors.from_checkpoint(
                    pretrained_model_name_or_path, kwargs, prefixes=("mtp.",), text_only=False
                )
        if getattr(model, "generation_config", None) is not None and model.generation_config._from_model_config:
            _use_recommended_sampling(model)
        return loaded

    @classmethod
    def _check_weights_fit_config(cls, name_or_path, kwargs: dict) -> None:
        """Before anything is allocated: the local checkpoint's tensor shapes and dtypes (file headers only) against
        the config the model will be built from. A config.json that does not describe the weights (a composite one
        without text_config builds the 9B) is refused here, not after a model of the wrong size was allocated.
        Missing tensors are transformers' to report; ``ignore_mismatched_sizes=True`` skips the shape check."""
        directory = local_checkpoint_directory(name_or_path, kwargs)
        if directory is None:
            return
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            try:
                config = cls.config_class.from_pretrained(directory)
            except Exception:
                return  # transformers reports an unreadable config itself
        with_vision = not isinstance(config, Qwen3_5TextConfig)
        check_checkpoint_tensors(
            directory, config, with_vision, check_shapes=not kwargs.get("ignore_mismatched_sizes", False)
        )

    @classmethod
    def _from_config(cls, config, **kwargs):
        # from_pretrained keeps the fp32-strict parameters in fp32 under any dtype; transformers' _from_config
        # (AutoModel*.from_config(..., dtype=...)) casts everything, so widen them back here.
        model = super()._from_config(config, **kwargs)
        for name, parameter in model.named_parameters():
            if parameter.dtype != torch.float32 and any(key in name for key in cls._keep_in_fp32_modules_strict):
                parameter.data = parameter.data.float()
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        is_main = kwargs.get("is_main_process", True)
        if self.carried_tensors is not None and is_main and kwargs.get("safe_serialization", True):
            self.carried_tensors.write(save_directory, self.config)

    def generate(self, *args, **kwargs):
        if "enable_thinking" in kwargs:
            # The prompt is already rendered by then; ignoring the switch would silently use the other mode.
            raise ValueError(
                "enable_thinking is a chat-template option, not a generate() argument: pass it to "
                "apply_chat_template(..., enable_thinking=...), or to pipeline('text-generation') as "
                "tokenizer_encode_kwargs={'enable_thinking': ...} (pipeline('image-text-to-text') takes it directly)."
            )
        draft_tokens = kwargs.pop("mtp_draft_tokens", 0)
        static = _static_cache_requested(self, kwargs)
        if draft_tokens or static:
            # Self-speculative decoding with the checkpoint's MTP head and/or fixed-shape decoding state (CUDA
            # graphs on a GPU): transformers prepares the inputs, speculative.py runs the loop.
            from . import speculative

            speculative.check_request(self, draft_tokens, kwargs)
            if kwargs.get("custom_generate") is not None:
                raise ValueError(
                    "mtp_draft_tokens / cache_implementation='static' cannot be combined with custom_generate."
                )
            # transformers hands a custom_generate callable neither the streamer nor synced_gpus: bind them here.
            decode = functools.partial(
                speculative.mtp_generate,
                draft_tokens=draft_tokens,
                static=static,
                streamer=kwargs.pop("streamer", None),
                synced_gpus=kwargs.pop("synced_gpus", None),
            )
            return super().generate(*args, custom_generate=decode, **kwargs)
        return super().generate(*args, **kwargs)

    def _head_output(
        self, outputs, labels, logits_to_keep, vocab_size, kwargs, skip_logits=None
    ) -> CausalLMOutputWithPast:
        """``lm_head`` on the kept positions, and the loss when labels are given (for the two generating heads).

        ``skip_logits`` (the forward keyword): True computes the loss chunk by chunk (chunked_loss.py) and returns
        ``logits=None``, so full-vocabulary fp32 logits never exist for the whole sequence; False materialises the
        logits; None (default) skips them exactly when ``self.training and labels is not None`` (a training step
        reads only the loss; eval, ``Trainer.prediction_step`` and generation get logits), unless the model's
        ``skip_logits_in_training`` is False. A custom ``loss_function`` gets the logits it is written for, so the
        default then keeps them, and True is refused."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = outputs.last_hidden_state[:, keep, :]
        standard_loss = self.loss_function is ForCausalLMLoss
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns only the loss, so it needs labels")
        if skip_logits and not standard_loss:
            raise ValueError("skip_logits=True computes ForCausalLMLoss chunk by chunk; this model has a custom loss")
        if skip_logits is None:
            skip_logits = self.training and labels is not None and standard_loss and self.skip_logits_in_training
        loss = logits = None
        if skip_logits:
            loss = causal_lm_loss(hidden, self.lm_head, labels, vocab_size, chunk_size=self.loss_chunk_size, **kwargs)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own Qwen3_5HybridCache

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Qwen3_5GatedDeltaNet):
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(0.01, 16).log_())
        elif isinstance(module, Qwen3_5RMSNormGated):
            init.ones_(module.weight)
        elif isinstance(module, Qwen3_5RMSNorm):
            init.zeros_(module.weight)


def _static_cache_requested(model, kwargs: dict) -> bool:
    """Whether ``generate()`` decodes on our fixed-shape state (static_decode.py: a static *hybrid* cache, CUDA graphs
    on a GPU): asked for with ``cache_implementation="static"`` (argument or generation config), and the default on
    CUDA for the requests it serves. ``cache_implementation="dynamic"`` keeps transformers' own loop. The request is
    taken out of what transformers sees, which would otherwise build its attention-only StaticCache or DynamicCache."""
    requested = kwargs.pop("cache_implementation", None)
    if requested == "dynamic":
        return False  # our growing hybrid cache, transformers' loop
    if requested not in (None, "static"):
        kwargs["cache_implementation"] = requested
        return False
    config = kwargs.get("generation_config") or model.generation_config
    configured = getattr(config, "cache_implementation", None)
    if requested is None and configured == "static":
        requested = "static"
    if requested == "static" and configured == "static":
        config = copy.deepcopy(config)
        config.cache_implementation = None
        kwargs["generation_config"] = config
    if requested is None and configured is None:
        return _static_by_default(model, kwargs)
    return requested == "static"


def _decodes_on_cuda_graphs(model) -> bool:
    from .static_decode import cuda_graphs_enabled

    return model.device.type == "cuda" and cuda_graphs_enabled()


def _static_by_default(model, kwargs: dict) -> bool:
    """On CUDA, plain ``generate()`` replays each decoding step as a CUDA graph (many times faster than launching
    ~24 layers of small kernels from Python) whenever the request is one the static loop serves exactly; anything
    else (beam search, per-step outputs, a cache to continue, a returned cache...) keeps transformers' loop."""
    from . import speculative
    from .static_decode import adapter_layers, moved_by_hooks

    if not _decodes_on_cuda_graphs(model) or moved_by_hooks(model):
        return False
    if adapter_layers(model):
        # PEFT adapters switch in Python (enable, disable, set_adapter, scale): each switch would need a new capture.
        # Such models keep transformers' loop unless asked (cache_implementation="static" recaptures on a switch).
        return False
    config = kwargs.get("generation_config") or model.generation_config
    for key in ("return_dict_in_generate", "custom_generate", "synced_gpus"):
        if kwargs.get(key, getattr(config, key, None)):
            return False
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        return False
    try:
        speculative.check_request(model, 0, kwargs)
    except ValueError:
        return False
    return True


# The official vocabulary's end-of-turn and end-of-text ids: chat generation must stop at either.
OFFICIAL_VOCAB_SIZE, IM_END_ID, ENDOFTEXT_ID = 248320, 248046, 248044


def _use_recommended_sampling(model) -> None:
    """A checkpoint without ``generation_config.json`` samples as its model card recommends for its size's default
    mode, and stops at end of turn, instead of greedy decoding that runs past ``<|im_end|>`` (see sampling.py)."""
    from .presets import size_of
    from .sampling import recommended_generation_config

    size = size_of(model.config)
    if size is None:
        return
    extra = {}
    if model.config.get_text_config().vocab_size == OFFICIAL_VOCAB_SIZE:
        extra = dict(eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID)
    model.generation_config = recommended_generation_config(size, **extra)
    model.recommended_sampling_size = size  # qwen35 chat switches the setting with the mode


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, continuing: bool = False) -> None:
    """Refuse ids the embedding cannot look up, before it does (on CUDA that would be a device-side assert that
    ruins the process's CUDA context). One-token steps of a running generation are the model's own samples and skip
    the device sync on GPU."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, tokens) with at least one token, got shape {tuple(input_ids.shape)}: "
            "tokenize a non-empty prompt (a 1-D tensor needs [None] for a batch of one)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}.")
    if torch.compiler.is_compiling() or (continuing and input_ids.shape[1] == 1 and input_ids.device.type != "cpu"):
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds the id {bad}, outside this model's vocabulary of {vocab_size} ids (0 to {vocab_size - 1})"
            ": encode the text with this checkpoint's tokenizer, and pad with its pad_token_id."
        )


def check_position_ids(position_ids: torch.Tensor, batch: int, length: int) -> None:
    """Shapes ``(B or 1, T)``, ``(3 or 4, B or 1, T)``, integer values; else a ValueError that says what fits."""
    if position_ids.dim() in (2, 3) and (position_ids.shape[-1] != length or position_ids.shape[-2] not in (1, batch)):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)} but the input is {batch} row(s) of {length} token(s): "
            f"give (batch or 1, {length}), or (3 or 4, batch or 1, {length}) for multimodal positions."
        )
    if position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must hold integer positions, got {position_ids.dtype}.")


def _text_positions(position_ids, batch, length, past, device):
    """Split any accepted position layout into (text positions (B, T) or None, rope rows (3, B, T))."""
    if position_ids is None:
        text = torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, -1)
        return None, text.unsqueeze(0).expand(3, -1, -1)
    check_position_ids(position_ids, batch, length)
    if position_ids.dim() == 2:
        return position_ids, position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[0], position_ids[1:]
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return None, position_ids
    raise ValueError(
        f"position_ids must have shape (batch, seq), (3, batch, seq) or (4, batch, seq); got {tuple(position_ids.shape)}."
    )


def _attention_mask(key_valid, segments, batch, length, past, device, needs_causal_mask):
    """Boolean ``(B, 1, T, past + T)`` mask (True = may attend), or None when the kernel's own causal flag is exact
    (SDPA's ``is_causal`` aligns queries to the top left, so it is exact only without a cache)."""
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


def hidden_state_selection(output_hidden_states, count: int) -> set[int] | None:
    """The hidden states ``output_hidden_states`` selects, as transformers 5.2x reads it: a flag (bool or None) selects
    all (None here); an int or a list of ints selects those indices of the ``count`` states (embeddings, then each
    layer), negative ones counted from the end, out-of-range ones selecting nothing. Unselected states are returned as
    None in their places."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return None
    chosen = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {index % count for index in chosen if -count <= index < count}


class Qwen3_5TextModel(Qwen3_5PreTrainedModel):
    config: Qwen3_5TextConfig
    config_class = Qwen3_5TextConfig

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3_5RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3_5TextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def norm_modules(self) -> list[Qwen3_5RMSNorm]:
        """The zero-centred RMSNorms of the layers and the final norm, for ``kernels.norm_weights_prepared`` (found
        afresh each time: modules can be swapped)."""
        return [module for module in self.modules() if isinstance(module, Qwen3_5RMSNorm)]

    def layers_checkpointed(self) -> bool:
        """Whether this training forward recomputes its layers in backward (activation checkpointing)."""
        return self.training and any(layer.gradient_checkpointing for layer in self.layers)

    def decoder_stack(self, hidden_states, position_embeddings, on_layer=None, **layer_kwargs) -> torch.Tensor:
        """The decoder layers and the final norm over ``hidden_states``; ``layer_kwargs`` go to every layer (masks,
        segments, cache, ...) and ``on_layer(layer, hidden_states, attention_weights)`` is called after each. The one
        loop behind the forward, the static decoding block (static_decode.py) and the graphed training step
        (training_graphs.py).

        For a few tokens (decoding, speculative blocks), where a step is mostly kernel launches, each layer's last
        residual add is left to the next layer's first norm (see the decoder layer). Not for long inputs: the unadded
        pair stays referenced here through the next layer, one more hidden-size tensor at the peak (134 MB at a 64k
        prefill of 0.8B); nor when each layer's output is watched, or layers are checkpointed (reentrant
        checkpointing only sees positional tensors)."""
        batch, length = hidden_states.shape[:2]
        defer = batch * length <= DEFER_RESIDUAL_TOKENS and on_layer is None and not self.layers_checkpointed()
        pending = None
        with kernels.norm_weights_prepared(self, hidden_states):
            for layer in self.layers:
                hidden_states, weights = layer(
                    hidden_states, position_embeddings=position_embeddings, mlp_output=pending,
                    defer_mlp_output=defer, **layer_kwargs,
                )  # fmt: skip
                if defer:
                    hidden_states, pending = hidden_states
                if on_layer is not None:
                    on_layer(layer, hidden_states, weights)
            return self.norm(pending, residual=hidden_states)[0] if defer else self.norm(hidden_states)

    def resolve_use_cache(self, use_cache: bool | None) -> bool:
        """Training keeps no cache unless asked; with activation checkpointing never: the recomputed forward would
        append the same keys to it a second time."""
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and self.layers_checkpointed():
            return False
        return use_cache

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        cache_position=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        selected_layers = hidden_state_selection(output_hidden_states, self.config.num_hidden_layers + 1)
        output_hidden_states = bool(output_hidden_states)
        use_cache = self.resolve_use_cache(use_cache)
        cache = model_state(cache if cache is not None else past_key_values, self.config)
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size, continuing=cache is not None and cache.seen_tokens > 0)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds must be (batch, tokens, hidden) with at least one token, got {tuple(inputs_embeds.shape)}."
            )
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D (batch, past + seq) padding mask, got shape {tuple(attention_mask.shape)}."
            )
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.bool()
            if key_valid.shape[-1] != past + length:
                raise ValueError(
                    f"attention_mask covers {key_valid.shape[-1]} positions but the cache holds {past} and the input "
                    f"adds {length}: it must cover both."
                )
        text_positions, rope_positions = _text_positions(position_ids, batch, length, past, device)
        segments = find_segments(
            text_positions,
            attention_mask,
            past,
            (batch, length),
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            seq_idx=kwargs.pop("seq_idx", None),
        )
        if segments is not None and cache is not None and past > 0:
            raise ValueError("A packed batch cannot continue a cache: pack only fresh sequences.")
        if use_cache and cache is None and segments is None:
            cache = Qwen3_5HybridCache(self.config)

        implementation = self.config._attn_implementation or "eager"
        if implementation.startswith("flash") or "flash" in implementation:
            attention_mask_4d = attention_mask if key_valid is not None else None
            if segments is not None:
                kwargs.setdefault("cu_seq_lens_q", segments.cu_seqlens)
                kwargs.setdefault("cu_seq_lens_k", segments.cu_seqlens)
                kwargs.setdefault("max_length_q", segments.max_length)
                kwargs.setdefault("max_length_k", segments.max_length)
        else:
            attention_mask_4d = _attention_mask(
                key_valid, segments, batch, length, past, device, needs_causal_mask=implementation == "eager"
            )
        padding_mask = key_valid[:, -length:] if key_valid is not None and length > 1 else None

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, rope_positions)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None

        def collect(layer, hidden, weights):
            if output_hidden_states:
                all_hidden_states.append(hidden)
            if output_attentions and layer.layer_type == FULL_ATTENTION:
                all_attentions.append(weights)

        if training_graphs.can_graph(
            self, hidden_states, cache=cache if use_cache else None, segments=segments,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        ):  # fmt: skip
            # The layers and final norm replayed from CUDA graphs (training_graphs.py).
            hidden_states = training_graphs.run(
                self, hidden_states, *position_embeddings, attention_mask_4d, padding_mask
            )
        else:
            hidden_states = self.decoder_stack(
                hidden_states,
                position_embeddings,
                on_layer=collect if output_hidden_states or output_attentions else None,
                attention_mask=attention_mask_4d,
                padding_mask=padding_mask,
                segments=segments,
                cache=cache if use_cache else None,
                position_ids=text_positions,
                **kwargs,
            )
        if output_hidden_states:
            all_hidden_states = (*all_hidden_states[:-1], hidden_states)
            if selected_layers is not None:
                all_hidden_states = tuple(
                    state if index in selected_layers else None for index, state in enumerate(all_hidden_states)
                )
        if use_cache and cache is not None:
            cache.seen_tokens += length

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: returned_cache(cache) if use_cache else None},
        )


# Tensor / pipeline parallel plans of the LM heads, as built-in's (the decoder's are in the config classes).
LM_HEAD_TP_PLAN = {"lm_head": "colwise_gather_output"}
LM_HEAD_PP_PLAN = {"lm_head": (["hidden_states"], ["logits"])}


class Qwen3_5ForCausalLM(Qwen3_5PreTrainedModel, GenerationMixin):
    config: Qwen3_5TextConfig
    config_class = Qwen3_5TextConfig
    _tp_plan = LM_HEAD_TP_PLAN
    _pp_plan = LM_HEAD_PP_PLAN
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__(config)
        self.model = Qwen3_5TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        cache=None,
        cache_position=None,
        skip_logits=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache=cache,
            return_dict=True,
            **kwargs,
        )
        return self._head_output(outputs, labels, logits_to_keep, self.config.vocab_size, kwargs, skip_logits)
