"""The transformers model contract, item by item, over our public model classes (issue 17, built up in steps).

Each test calls an API the way transformers' own code and users do, and compares with built-in transformers'
``qwen3_5`` classes where they define the expected behaviour.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_composite_dict, tiny_text_kwargs
from transformers.modeling_outputs import ModelOutput

from transformers_qwen35 import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3_5TextConfig,
    Qwen3_5TextModel,
)

# (class, config builder): the four public model classes
MODELS = {
    "text-model": (Qwen3_5TextModel, lambda: Qwen3_5TextConfig(**tiny_text_kwargs())),
    "causal-lm": (Qwen3_5ForCausalLM, lambda: Qwen3_5TextConfig(**tiny_text_kwargs())),
    "vl-model": (Qwen3_5Model, lambda: Qwen3_5Config(**tiny_composite_dict())),
    "vl-generation": (Qwen3_5ForConditionalGeneration, lambda: Qwen3_5Config(**tiny_composite_dict())),
}
IDS = torch.tensor([[5, 9, 13, 21, 7, 3]])


def build(kind: str):
    cls, config = MODELS[kind]
    torch.manual_seed(0)
    return cls(config()).eval()


@pytest.fixture(params=sorted(MODELS))
def kind(request):
    return request.param


def test_output_loading_info_returns_the_model_and_its_report(kind, tmp_path):
    model = build(kind)
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_weights_given_as_a_state_dict_with_no_path(kind):
    model = build(kind)
    state = {name: value + 1.0 for name, value in model.state_dict().items()}
    loaded = type(model).from_pretrained(None, config=model.config, state_dict=state)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name].to(value.dtype)), name
    assert loaded.carried_tensors is None


def test_return_dict_false_gives_a_tuple_with_the_same_values(kind):
    model = build(kind)
    with torch.no_grad():
        as_dict = model(IDS)
        as_tuple = model(IDS, return_dict=False)
    assert isinstance(as_dict, ModelOutput)
    assert type(as_tuple) is tuple
    assert torch.equal(as_tuple[0], as_dict.to_tuple()[0])
    model.config.return_dict = False  # the config default is honoured too, and an explicit True wins over it
    with torch.no_grad():
        assert type(model(IDS)) is tuple
        assert isinstance(model(IDS, return_dict=True), ModelOutput)
