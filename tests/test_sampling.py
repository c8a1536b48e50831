"""Recommended sampling per size and mode (model cards), the presence penalty, and defaults on load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from transformers_qwen35.generation.sampling import (
    PresencePenaltyLogitsProcessor,
    recommended_sampling,
    thinking_by_default,
)
from transformers_qwen35.model import presets
from transformers_qwen35.model.checkpoint import write_random_checkpoint


@pytest.mark.parametrize(
    "size, thinking, vision, expected",
    [
        ("0.8B", None, False, (1.0, 1.0, 20, 2.0)),  # default mode of the small models: non-thinking
        ("2B", False, True, (0.7, 0.8, 20, 1.5)),
        ("2B", True, False, (1.0, 0.95, 20, 1.5)),
        ("0.8B", True, True, (0.6, 0.95, 20, 0.0)),
        ("9B", None, False, (1.0, 0.95, 20, 1.5)),  # default mode of the large models: thinking
        ("4B", False, False, (0.7, 0.8, 20, 1.5)),
    ],
)
def test_card_settings(size, thinking, vision, expected):
    settings = recommended_sampling(size, thinking, vision)
    assert (settings["temperature"], settings["top_p"], settings["top_k"], settings["presence_penalty"]) == expected
    assert settings["do_sample"] and settings["min_p"] == 0.0 and settings["repetition_penalty"] == 1.0


def test_default_modes_and_unknown_sizes():
    assert [thinking_by_default(size) for size in ("0.8B", "2B", "4B", "9B")] == [False, False, True, True]
    with pytest.raises(ValueError, match="0.8B, 2B, 4B, 9B"):
        recommended_sampling("27B")


def test_size_of_recognises_the_official_shapes_only():
    assert [presets.size_of(presets.official_config(size)) for size in presets.SIZES] == list(presets.SIZES)
    assert presets.size_of(presets.tiny_config()) is None


def test_presence_penalty_counts_generated_tokens_only():
    processor = PresencePenaltyLogitsProcessor(1.5)
    prompt = torch.tensor([[3, 3, 4]])
    scores = torch.zeros(1, 8)
    assert torch.equal(processor(prompt, scores), scores)  # first call: the prompt, nothing generated yet
    out = processor(torch.tensor([[3, 3, 4, 5, 5, 6]]), scores)
    assert out[0].tolist() == [0, 0, 0, 0, 0, -1.5, -1.5, 0]  # once per token present, however often


def test_checkpoint_without_generation_config_samples_as_recommended(tmp_path, monkeypatch):
    write_random_checkpoint(tmp_path / "plain", presets.tiny_config(), seed=0)
    monkeypatch.setattr(presets, "size_of", lambda config: "0.8B")  # a tiny stand-in for a 0.8B checkpoint
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 1.0, 1.0, 20)

    write_random_checkpoint(tmp_path / "own", presets.tiny_config(), seed=0)
    (tmp_path / "own" / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 7}))
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "own").generation_config
    assert config.do_sample is False and config.max_new_tokens == 7  # the checkpoint's own settings win


def test_apply_card_sets_the_mode_and_returns_the_presence_penalty():
    from transformers import GenerationConfig

    from transformers_qwen35.generation.sampling import apply_card

    settings = GenerationConfig(do_sample=False, max_new_tokens=5)
    processors = apply_card(settings, "4B", thinking=False)
    assert (settings.do_sample, settings.temperature, settings.top_p, settings.top_k) == (True, 0.7, 0.8, 20)
    assert settings.max_new_tokens == 5  # only sampling knobs change
    assert [type(p).__name__ for p in processors] == ["PresencePenaltyLogitsProcessor"] and processors[0].penalty == 1.5
    assert apply_card(GenerationConfig(), "2B", thinking=True, vision=True) == []  # that card row has no penalty
