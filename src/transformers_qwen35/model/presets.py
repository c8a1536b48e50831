"""The hyper-parameters of the four official checkpoints, as their ``config.json`` files give them.

Used by tests (parameter and tensor counts are checked against the official index files), benchmarks (random
weights of the real shapes) and the demo (a tiny model of the same layout).
"""

from __future__ import annotations

from ..core.configuration import Qwen3_5Config

ROPE = {
    "mrope_interleaved": True,
    "mrope_section": [11, 11, 10],
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000000,
    "rope_type": "default",
}

# size: (hidden, layers, intermediate, heads, kv heads, linear value heads, tied, vision depth, width, mlp, heads)
_SIZES = {
    "0.8B": (1024, 24, 3584, 8, 2, 16, True, 12, 768, 3072, 12),
    "2B": (2048, 24, 6144, 8, 2, 16, True, 24, 1024, 4096, 16),
    "4B": (2560, 32, 9216, 16, 4, 32, True, 24, 1024, 4096, 16),
    "9B": (4096, 32, 12288, 16, 4, 32, False, 27, 1152, 4304, 16),
}
SIZES = tuple(_SIZES)


def official_config_dict(size: str) -> dict:
    """The ``config.json`` of ``Qwen/Qwen3.5-<size>`` (keys the model ignores included)."""
    if size not in _SIZES:
        raise ValueError(f"Unknown Qwen3.5 size {size!r}; choose one of {', '.join(SIZES)}.")
    hidden, layers, inter, heads, kv, v_heads, tied, depth, v_hidden, v_inter, v_heads_vis = _SIZES[size]
    text = {
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": 248044,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": v_heads,
        "linear_value_head_dim": 128,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": 262144,
        "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_parameters": dict(ROPE),
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": 248320,
    }
    vision = {
        "deepstack_visual_indexes": [],
        "depth": depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": v_hidden,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": v_inter,
        "model_type": "qwen3_5",
        "num_heads": v_heads_vis,
        "num_position_embeddings": 2304,
        "out_hidden_size": hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": 248056,
        "model_type": "qwen3_5",
        "text_config": text,
        "tie_word_embeddings": tied,
        "video_token_id": 248057,
        "vision_config": vision,
        "vision_end_token_id": 248054,
        "vision_start_token_id": 248053,
    }


def official_config(size: str) -> Qwen3_5Config:
    return Qwen3_5Config(**official_config_dict(size))


def size_of(config) -> str | None:
    """Which official size a config (composite, text, or a ``config.json`` dict) has the shape of, or None.

    Width and depth must both match (llama.cpp tells the sizes apart the same way: 24 layers for 0.8B/2B, 32 for
    4B/9B, then the width); a pruned or widened derivative is not an official size.
    """
    if isinstance(config, dict):
        text = config.get("text_config") or config
        shape = (text.get("hidden_size"), text.get("num_hidden_layers"))
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        shape = (getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None))
    for size, values in _SIZES.items():
        if shape == (values[0], values[1]):
            return size
    return None


def tiny_config(vocab_size: int = 1024) -> Qwen3_5Config:
    """A composite config of the official layout, small enough for tests and the demo (milliseconds a step)."""
    config = official_config_dict("0.8B")
    config["text_config"].update(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        partial_rotary_factor=0.25,
        rope_parameters={**ROPE, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.25},
        eos_token_id=None,
    )
    config["vision_config"].update(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=16
    )
    # The multimodal placeholder ids sit at the top of the tiny vocabulary.
    for offset, key in enumerate(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")):
        config[key] = vocab_size - 4 + offset
    return Qwen3_5Config(**config)
