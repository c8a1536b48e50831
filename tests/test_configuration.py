"""Configs read the official config.json files unchanged and write every key back; bad values name the field."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from transformers_qwen35 import Qwen3_5Config, Qwen3_5TextConfig, Qwen3_5VisionConfig
from transformers_qwen35.model.presets import SIZES, official_config_dict


def _missing_or_changed(original: dict, written: dict, prefix: str = "") -> list[str]:
    problems = []
    for key, value in original.items():
        if key == "transformers_version":
            continue
        if key not in written:
            problems.append(f"missing {prefix}{key}")
        elif isinstance(value, dict):
            problems += _missing_or_changed(value, written[key], f"{prefix}{key}.")
        elif written[key] != value:
            problems.append(f"changed {prefix}{key}: {value!r} -> {written[key]!r}")
    return problems


@pytest.mark.parametrize("size", SIZES)
def test_official_config_round_trips_without_losing_a_key(size, tmp_path):
    original = official_config_dict(size)
    (tmp_path / "config.json").write_text(json.dumps(original))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is Qwen3_5Config
    assert type(config.text_config) is Qwen3_5TextConfig and type(config.vision_config) is Qwen3_5VisionConfig
    assert config.text_config.rope_parameters["rope_theta"] == 10000000
    assert config.vision_config.depth == original["vision_config"]["depth"]
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert _missing_or_changed(original, written) == []
    assert written["vision_config"]["model_type"] == "qwen3_5"  # the official quirk, kept as read
    reread = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    expected = config.to_dict()
    for data in (reread, expected):
        data.pop("_name_or_path")
    assert reread == expected


def test_text_config_derives_layer_types_and_the_official_mrope_section():
    config = Qwen3_5TextConfig(num_hidden_layers=8)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]
    assert config.rotary_dim == 64 and config.mrope_section == [11, 11, 10]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3), "layer_types"),
        (dict(num_hidden_layers=2, layer_types=["linear_attention", "sliding_attention"]), "layer_types"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
        (dict(linear_num_key_heads=16, linear_num_value_heads=24), "linear_num_value_heads"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 11]}),
            "mrope_section",
        ),
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_inconsistent_text_values_raise_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Qwen3_5TextConfig(**kwargs)


def test_inconsistent_vision_values_raise():
    with pytest.raises(ValueError, match="num_heads|hidden_size"):
        Qwen3_5VisionConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="num_position_embeddings"):
        Qwen3_5VisionConfig(num_position_embeddings=2000)
