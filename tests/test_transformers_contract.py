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


@pytest.mark.parametrize("selection", [[0, -1], 2, [1, 3, 99], []])
def test_output_hidden_states_selects_layers_as_transformers_does(kind, selection):
    """An int or a list picks hidden states by index (negative from the end); the others are None in place."""
    model = build(kind)
    with torch.no_grad():
        every = model(IDS, output_hidden_states=True).hidden_states
        chosen = model(IDS, output_hidden_states=selection).hidden_states
    if selection == []:
        assert chosen is None
        return
    wanted = {index % len(every) for index in ([selection] if isinstance(selection, int) else selection)
              if -len(every) <= index < len(every)}  # fmt: skip
    assert len(chosen) == len(every) == 5  # embeddings + 4 layers
    for index, (all_state, state) in enumerate(zip(every, chosen)):
        if index in wanted:
            assert torch.equal(state, all_state), index
        else:
            assert state is None, index


def test_output_hidden_states_selection_matches_builtin():
    from conftest import build_pair, relative_error

    output_capturing = pytest.importorskip("transformers.utils.output_capturing")
    if not hasattr(output_capturing, "selected_hidden_states"):
        pytest.skip("this transformers release has no hidden-state selection")
    ours, native = build_pair()
    with torch.no_grad():
        mine = ours(IDS, output_hidden_states=[0, 2, -1]).hidden_states
        theirs = native(IDS, output_hidden_states=[0, 2, -1]).hidden_states
    assert [state is None for state in mine] == [state is None for state in theirs]
    for state, reference in zip(mine, theirs):
        if reference is not None:
            assert relative_error(state, reference) < 1e-5


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["causal-lm", "vl-generation"])
def test_parallel_plans_equal_builtin(kind, tied):
    """The tensor-parallel plan (lm_head included, so a tied head is split as its embedding is) and the
    pipeline plan are built-in's."""
    from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

    if kind == "causal-lm":
        kwargs = tiny_text_kwargs(tie_word_embeddings=tied)
        ours = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**kwargs))
        native = modeling_qwen3_5.Qwen3_5ForCausalLM(configuration_qwen3_5.Qwen3_5TextConfig(**kwargs))
    else:
        kwargs = tiny_composite_dict(tie_word_embeddings=tied)
        ours = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**kwargs))
        native = modeling_qwen3_5.Qwen3_5ForConditionalGeneration(configuration_qwen3_5.Qwen3_5Config(**kwargs))
    plan = dict(ours.tp_plan)
    # transformers 5.16's composite model has no lm_head entry (fixed later); ours has it on every version
    assert plan.pop("lm_head") == native.tp_plan.get("lm_head", "colwise_gather_output")
    assert plan == {name: style for name, style in native.tp_plan.items() if name != "lm_head"}
    assert ours.pp_plan == native.pp_plan


def test_fp32_strict_parameters_stay_fp32_under_every_constructor(kind, tmp_path):
    """A_log and the DeltaNet output norm stay fp32 in a bf16 model built by from_pretrained, _from_config and the
    Auto factories' from_config (built-in casts them under _from_config); everything else is bf16."""
    from transformers import AutoModel

    cls, config = MODELS[kind]
    build(kind).save_pretrained(tmp_path)
    models = {
        "from_pretrained": cls.from_pretrained(tmp_path, dtype=torch.bfloat16),
        "_from_config": cls._from_config(config(), dtype=torch.bfloat16),
    }
    if kind in ("text-model", "vl-model"):
        models["AutoModel.from_config"] = AutoModel.from_config(config(), dtype=torch.bfloat16)
    for how, model in models.items():
        strict = {name for name, _ in model.named_parameters() if "A_log" in name or "linear_attn.norm" in name}
        assert strict, how
        for name, parameter in model.named_parameters():
            assert parameter.dtype == (torch.float32 if name in strict else torch.bfloat16), (how, name)


@pytest.mark.parametrize("kind", ["causal-lm", "vl-generation"])
def test_set_attn_implementation_switches_the_running_model(kind):
    """transformers decides from the module source whether a model can switch; ours can, and then runs the other
    implementation: eager returns attention weights, sdpa none, with the same logits."""
    cls, config = MODELS[kind]
    built = config()
    built._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls._from_config(built, attn_implementation="sdpa").eval()
    assert cls._can_set_attn_implementation()
    with torch.no_grad():
        sdpa = model(IDS, output_attentions=True)
    model.set_attn_implementation("eager")
    text_config = model.config.get_text_config()
    assert text_config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(IDS, output_attentions=True)
    assert all(weights is None for weights in sdpa.attentions)
    assert all(weights is not None for weights in eager.attentions) and len(eager.attentions) == 2
    assert torch.allclose(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-5)
