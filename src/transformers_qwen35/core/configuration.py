"""Configuration classes for Qwen3.5 (0.8B / 2B / 4B / 9B).

They read every official ``config.json`` unchanged and write it back without losing a key:

* the composite ``Qwen3_5Config`` (``model_type="qwen3_5"``) holds a ``text_config`` and a ``vision_config``;
* the official files say ``vision_config.model_type == "qwen3_5"`` (written by transformers 5.2, whose vision class
  reused the composite's name). We build the vision class from it directly, never through ``AutoConfig`` (which would
  return the composite class), and write the string back as it was read;
* keys the model does not use (``attn_output_gate``, ``mtp_num_hidden_layers``, ``mamba_ssm_dtype``, a top-level
  ``partial_rotary_factor``...) are kept as plain attributes and serialised again.

Inconsistent values raise a ``ValueError`` that names the field, before any weight is allocated.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)

# transformers >= 5.20 declares sub-configs through `sub_configs_defaults`; older 5.x through `sub_configs`.
_SUB_CONFIGS_ATTR = "sub_configs_defaults" if hasattr(PretrainedConfig, "sub_configs_defaults") else "sub_configs"


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def _divides(config: Any, numerator: str, denominator: str) -> None:
    num, den = getattr(config, numerator), getattr(config, denominator)
    if num % den:
        raise ValueError(
            f"{type(config).__name__}.{numerator} ({num}) must be a multiple of {denominator} ({den}): "
            f"each of the {den} groups needs the same number of heads."
        )


class Qwen3_5TextConfig(PretrainedConfig):
    """The language model: Gated DeltaNet and gated full-attention layers mixed by ``layer_types``.

    Defaults are the 9B's text hyper-parameters except ``rope_theta`` (10,000 here; the checkpoints use 10,000,000)
    and ``max_position_embeddings`` (32,768 here; the checkpoints say 262,144), as in built-in transformers.
    """

    model_type = "qwen3_5_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    ignore_keys_at_rope_validation = {"mrope_section", "mrope_interleaved"}
    # Built-in's plan (transformers 5.16-5.25): heads split across devices in attention and the MLP; the DeltaNet
    # projections' outputs gathered again, so its recurrence runs whole on each device.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.linear_attn.in_proj_qkv": "colwise_gather_output",
        "layers.*.linear_attn.in_proj_z": "colwise_gather_output",
        "layers.*.linear_attn.in_proj_b": "colwise_gather_output",
        "layers.*.linear_attn.in_proj_a": "colwise_gather_output",
        "layers.*.linear_attn.out_proj": "colwise_gather_output",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            interval = kwargs.get("full_attention_interval", 4)
            self.layer_types = [
                FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        # RoPE standardisation consumes these top-level keys; the official files carry them, so keep them.
        kept = {key: kwargs[key] for key in ("partial_rotary_factor", "rope_theta") if key in kwargs}
        kwargs.setdefault("partial_rotary_factor", 0.25)
        self._validate_text()
        super().__post_init__(**kwargs)
        for key, value in kept.items():
            setattr(self, key, value)
        self._validate_rope()

    def _validate_text(self) -> None:
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_conv_kernel_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
        )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"Qwen3_5TextConfig.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}: give one entry per layer."
            )
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(
                f"Qwen3_5TextConfig.layer_types contains {unknown}; each entry must be one of {LAYER_TYPES}."
            )
        _divides(self, "num_attention_heads", "num_key_value_heads")
        _divides(self, "linear_num_value_heads", "linear_num_key_heads")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            bad = [i for i in ids if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size)]
            if bad:
                raise ValueError(
                    f"Qwen3_5TextConfig.{name} is {value!r}, outside the vocabulary of {self.vocab_size} ids: use an id "
                    "of the tokenizer (e.g. tokenizer.pad_token_id), or None."
                )

    def _validate_rope(self) -> None:
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta", getattr(self, "rope_theta", None))
        if theta is not None and not (isinstance(theta, (int, float)) and 0 < theta < math.inf):
            raise ValueError(
                f"Qwen3_5TextConfig rope_theta must be a positive number (the official checkpoints use 10000000), got "
                f"{theta!r}: zero or negative bases make every rotary angle NaN."
            )
        eps = self.rms_norm_eps
        if not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
            raise ValueError(
                f"Qwen3_5TextConfig.rms_norm_eps must be 0 or a small positive number (the official value is 1e-06), "
                f"got {eps!r}: a negative epsilon makes the norms NaN."
            )
        rotary_dim = int(self.head_dim * rope.get("partial_rotary_factor", 1.0))
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > self.head_dim:
            raise ValueError(
                f"Qwen3_5TextConfig.rope_parameters['partial_rotary_factor'] gives a rotary dimension of {rotary_dim} "
                f"for head_dim {self.head_dim}; it must be even and between 2 and head_dim."
            )
        section = rope.get("mrope_section")
        if section is not None and sum(section) != rotary_dim // 2:
            raise ValueError(
                f"Qwen3_5TextConfig.rope_parameters['mrope_section'] {list(section)} sums to {sum(section)}, but the "
                f"rotary half-dimension is {rotary_dim // 2} (head_dim {self.head_dim} x partial_rotary_factor "
                f"{rope.get('partial_rotary_factor', 1.0)} / 2): make the sections add up to it."
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * (self.rope_parameters or {}).get("partial_rotary_factor", 1.0))

    @property
    def mrope_section(self) -> list[int]:
        """Slots of the interleaved multimodal RoPE per axis (T, H, W); the official [11, 11, 10] when absent."""
        section = (self.rope_parameters or {}).get("mrope_section")
        if section is not None:
            return list(section)
        half = self.rotary_dim // 2
        if half == 32:
            return [11, 11, 10]
        return [half - 2 * (half // 3), half // 3, half // 3]


class Qwen3_5VisionConfig(PretrainedConfig):
    """The vision tower (ViT with a learned 48x48 position grid, 2-D RoPE and a 2x2 patch merger)."""

    model_type = "qwen3_5_vision"
    base_config_key = "vision_config"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # The official files say "qwen3_5" here; remember it so that the file is written back as it was read.
        self._saved_model_type = kwargs.pop("model_type", self.model_type)
        super().__post_init__(**kwargs)
        _positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size")
        _divides(self, "hidden_size", "num_heads")
        grid = int(round(self.num_position_embeddings**0.5))
        if grid * grid != self.num_position_embeddings:
            raise ValueError(
                f"Qwen3_5VisionConfig.num_position_embeddings ({self.num_position_embeddings}) must be a square number: "
                "the learned position table is a square grid."
            )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        saved = output.pop("_saved_model_type", None)
        if saved in ("qwen3_5", self.model_type):
            output["model_type"] = saved
        return output


class Qwen3_5Config(PretrainedConfig):
    """The composite (vision + text) configuration that the official ``config.json`` files hold."""

    model_type = "qwen3_5"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    text_config: dict | PretrainedConfig | None = None
    vision_config: dict | PretrainedConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    tie_word_embeddings: bool = False

    if _SUB_CONFIGS_ATTR == "sub_configs_defaults":
        sub_configs_defaults = {"text_config": Qwen3_5TextConfig, "vision_config": Qwen3_5VisionConfig}
    else:
        sub_configs = {"text_config": Qwen3_5TextConfig, "vision_config": Qwen3_5VisionConfig}

    def __post_init__(self, **kwargs):
        # Built here, not through AutoConfig: the official vision dict says model_type "qwen3_5", which AutoConfig
        # would resolve to this composite class.
        self.text_config = _build_sub_config(Qwen3_5TextConfig, self.text_config)
        self.vision_config = _build_sub_config(Qwen3_5VisionConfig, self.vision_config)
        super().__post_init__(**kwargs)

    def get_text_config(self, *args, **kwargs) -> Qwen3_5TextConfig:
        return self.text_config


def _build_sub_config(cls: type[PretrainedConfig], value: Any) -> PretrainedConfig:
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, PretrainedConfig):
        return cls(**value.to_dict())
    if isinstance(value, dict):
        return cls(**value)
    raise ValueError(f"Expected a dict or a {cls.__name__} for a sub-config, got {type(value).__name__}.")


__all__ = ["Qwen3_5Config", "Qwen3_5TextConfig", "Qwen3_5VisionConfig", "LINEAR_ATTENTION", "FULL_ATTENTION"]
