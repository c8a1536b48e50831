"""Importing the package registers it over built-in transformers' qwen3_5 classes, idempotently."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import transformers_qwen35
from transformers_qwen35 import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3_5TextConfig,
    Qwen3_5TextModel,
)
from transformers_qwen35.model.presets import tiny_config


def test_auto_classes_resolve_to_this_package_and_register_is_idempotent():
    for _ in range(2):
        transformers_qwen35.register()
    assert type(AutoConfig.for_model("qwen3_5")) is Qwen3_5Config
    assert type(AutoConfig.for_model("qwen3_5_text")) is Qwen3_5TextConfig
    composite = tiny_config()
    assert type(AutoModelForCausalLM.from_config(composite)) is Qwen3_5ForCausalLM  # composite -> text-only LM
    assert type(AutoModelForCausalLM.from_config(composite.text_config)) is Qwen3_5ForCausalLM
    assert type(AutoModel.from_config(composite.text_config)) is Qwen3_5TextModel
    assert type(AutoModel.from_config(composite)) is Qwen3_5Model
    assert type(AutoModelForImageTextToText.from_config(composite)) is Qwen3_5ForConditionalGeneration
    assert AutoProcessor.from_pretrained._transformers_qwen35  # wrapped once, not once per register()
    assert not getattr(AutoProcessor.from_pretrained.__wrapped__, "_transformers_qwen35", False)
    assert Qwen3_5ForCausalLM.__name__ == "Qwen3_5ForCausalLM"  # saved configs read the same to other tools
