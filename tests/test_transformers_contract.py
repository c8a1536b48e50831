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


# --- the cache is a transformers Cache ------------------------------------------------------------------------------


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def _run(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, return_dict=True, **kwargs)


def _hidden(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _cache_field(output):
    return output.cache if "cache" in output else output.past_key_values


def test_the_returned_cache_has_transformers_layer_api(kind):
    from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin

    model = build(kind)
    config = _text_config(model)
    cache = _cache_field(_run(model, IDS.expand(2, -1), use_cache=True))
    assert isinstance(cache, Cache)
    assert len(cache) == len(cache.layers) == config.num_hidden_layers
    assert cache.get_seq_length() == IDS.shape[1]
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim
    conv_dim += config.linear_num_value_heads * config.linear_value_head_dim
    for layer, layer_type in zip(cache.layers, config.layer_types):
        if layer_type == "linear_attention":
            assert isinstance(layer, LinearAttentionCacheLayerMixin)
            assert layer.has_previous_state[0]
            assert layer.conv_states[0].shape == (2, conv_dim, config.linear_conv_kernel_dim)
            recurrent = layer.recurrent_states[0]
            assert recurrent.dtype == torch.float32
            assert recurrent.shape == (
                2, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
            )  # fmt: skip
        else:
            assert isinstance(layer, CacheLayerMixin)
            shape = (2, config.num_key_value_heads, IDS.shape[1], config.head_dim)
            assert layer.keys.shape == layer.values.shape == shape
            assert layer.get_mask_sizes(3) == (IDS.shape[1] + 3, 0)


def test_a_dynamic_cache_the_user_built_is_filled_in_place_and_continued(kind):
    """What the prompt-reuse docs teach: DynamicCache(config=model.config), a prompt forward, a continuation."""
    from transformers import DynamicCache

    model = build(kind)
    ids = torch.tensor([[5, 9, 13, 21, 7, 3, 8, 11, 2]])
    full = _hidden(_run(model, ids))
    cache = DynamicCache(config=model.config)
    first = _run(model, ids[:, :5], past_key_values=cache, use_cache=True)
    assert _cache_field(first) is cache
    assert int(cache.get_seq_length()) == 5
    second = _run(model, ids[:, 5:], past_key_values=cache, use_cache=True)
    assert _cache_field(second) is cache
    assert int(cache.get_seq_length()) == ids.shape[1]
    torch.testing.assert_close(_hidden(second), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_an_empty_dynamic_cache_without_config_is_accepted():
    from transformers import DynamicCache

    model = build("causal-lm")
    ids = torch.tensor([[5, 9, 13, 21, 7, 3]])
    cache = DynamicCache()
    _run(model, ids[:, :4], past_key_values=cache, use_cache=True)
    continued = _run(model, ids[:, 4:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(continued, _run(model, ids).logits[:, 4:], rtol=1e-5, atol=1e-5)


def test_builtin_and_ours_continue_each_others_caches():
    """The oracle: built-in transformers continues a cache our model filled (ours and a DynamicCache), and ours
    continues one built-in filled, to the logits of one uncached forward."""
    from conftest import build_pair
    from transformers import DynamicCache

    ours, native = build_pair()
    ids = torch.tensor([[5, 9, 13, 21, 7, 3, 8, 11]])
    full = _run(native, ids).logits
    filled_by_ours = [_cache_field(_run(ours, ids[:, :5], use_cache=True))]
    filled_by_ours.append(DynamicCache(config=ours.config))
    _run(ours, ids[:, :5], past_key_values=filled_by_ours[-1], use_cache=True)
    for cache in filled_by_ours:
        torch.testing.assert_close(_run(native, ids[:, 5:], past_key_values=cache).logits, full[:, 5:])
    filled_by_native = DynamicCache(config=native.config)
    _run(native, ids[:, :5], past_key_values=filled_by_native, use_cache=True)
    torch.testing.assert_close(_run(ours, ids[:, 5:], past_key_values=filled_by_native).logits, full[:, 5:])


@pytest.mark.parametrize("kind", ["causal-lm", "vl-generation"])
@pytest.mark.parametrize("make_cache", ["dynamic-config", "dynamic-empty"])
def test_generate_with_a_user_cache_equals_generate_without(kind, make_cache):
    from transformers import DynamicCache

    model = build(kind)
    ids = torch.tensor([[5, 9, 13, 21, 7, 3], [4, 8, 12, 16, 20, 24]])
    reference = model.generate(ids, max_new_tokens=6, do_sample=False)
    cache = DynamicCache(config=model.config) if make_cache == "dynamic-config" else DynamicCache()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    assert _cache_field(out) is cache
    assert int(cache.get_seq_length()) == reference.shape[1] - 1  # the last token is sampled, never fed


def test_beam_search_with_a_user_cache_equals_beam_search_without():
    """Beams reorder the cache every step: through transformers' own DynamicCache layers here."""
    from transformers import DynamicCache

    model = build("causal-lm")
    ids = torch.tensor([[5, 9, 13, 21, 7, 3]])
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    reference = model.generate(ids, **kwargs)
    with_cache = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(with_cache, reference)


def test_a_deep_copied_prompt_cache_serves_two_continuations():
    """Prompt reuse: one prefill, a deep copy per continuation; each continuation as from scratch."""
    import copy

    model = build("causal-lm")
    prompt = torch.tensor([[5, 9, 13, 21, 7, 3]])
    prompt_cache = _cache_field(_run(model, prompt, use_cache=True))
    for suffix in ([[8, 11]], [[40, 2, 17]]):
        ids = torch.cat([prompt, torch.tensor(suffix)], dim=1)
        reused = model.generate(ids, past_key_values=copy.deepcopy(prompt_cache), max_new_tokens=4, do_sample=False)
        assert torch.equal(reused, model.generate(ids, max_new_tokens=4, do_sample=False))
    assert prompt_cache.get_seq_length() == prompt.shape[1]  # the copies moved on, the original did not


def test_batch_operations_move_every_state_and_the_rope_offsets():
    model = build("vl-generation")
    ids = torch.tensor([[5, 9, 13, 21], [4, 8, 12, 16], [1, 7, 6, 30]])
    cache = _cache_field(_run(model, ids, use_cache=True))
    cache.rope_deltas = torch.tensor([[0], [1], [2]])

    def states(c):
        return [s for s in c.conv_states + c.recurrent_states + c.key_cache + c.value_cache if s is not None]

    before = [s.clone() for s in states(cache)]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for new, old in zip(states(cache), before):
        assert torch.equal(new, old[[2, 0, 1]])
    assert cache.rope_deltas.flatten().tolist() == [2, 0, 1]
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert cache.rope_deltas.flatten().tolist() == [0, 1]
    cache.batch_repeat_interleave(2)
    assert cache.rope_deltas.flatten().tolist() == [0, 0, 1, 1]
    for new, old in zip(states(cache), before):
        assert torch.equal(new, old[[0, 0, 1, 1]])
    assert cache.batch_size == 4


def test_crop_and_past_recording_are_refused_with_the_reason():
    model = build("causal-lm")
    cache = _cache_field(_run(model, IDS, use_cache=True))
    cache.crop(IDS.shape[1])  # nothing to remove: allowed
    for call in (lambda: cache.crop(2), lambda: cache.crop(-1), lambda: cache.layers[1].crop(1)):
        with pytest.raises(ValueError, match="cannot be rolled back"):
            call()
    with pytest.raises(ValueError, match="mtp_draft_tokens"):
        cache.activate_past_recording()


def test_caches_that_cannot_serve_are_refused_before_any_compute():
    from transformers import DynamicCache

    model = build("causal-lm")
    other = Qwen3_5TextConfig(**tiny_text_kwargs(num_hidden_layers=2, layer_types=["full_attention"] * 2))
    with pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        _run(model, IDS, past_key_values=DynamicCache(config=other), use_cache=True)
    with pytest.raises(TypeError, match="transformers Cache"):
        _run(model, IDS, past_key_values=((torch.zeros(1),),), use_cache=True)


def test_an_image_prompt_continues_from_a_user_cache():
    """The rope offset an image leaves (3-D positions) goes with the user's cache to the continuation."""
    from conftest import IMAGE_PAD, random_pixels, vision_run
    from transformers import DynamicCache

    model = build("vl-generation")
    grid = torch.tensor([[1, 4, 4]])  # 4 merged tokens
    ids = torch.tensor([[5, 9, *vision_run(4, IMAGE_PAD), 13, 21, 7, 3]])
    media = dict(pixel_values=random_pixels(grid.tolist()), image_grid_thw=grid)
    full = _run(model, ids, **media).logits
    cache = DynamicCache(config=model.config)
    _run(model, ids[:, :9], past_key_values=cache, use_cache=True, **media)
    continued = _run(model, ids[:, 9:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(continued, full[:, 9:], rtol=1e-5, atol=1e-5)


# --- RoPE scaling ---------------------------------------------------------------------------------------------------

SHORT_LIMIT = 16  # max_position_embeddings of these tests: inputs of 24-30 tokens reach past it
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": SHORT_LIMIT},
    "llama3": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": SHORT_LIMIT,
    },
    "longrope": {
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": SHORT_LIMIT,
    },
}  # fmt: skip


def _rope(scaling: str) -> dict:
    from conftest import ROPE

    return {**ROPE, **ROPE_SCALINGS[scaling]}


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_scaling_gives_builtins_logits_and_generation(scaling):
    """Past max_position_embeddings, where scaling changes the frequencies: one forward and a greedy generation
    (whose steps keep moving past the limit, where dynamic NTK rescales again) as built-in's."""
    from conftest import build_pair

    try:
        ours, native = build_pair(rope_parameters=_rope(scaling), max_position_embeddings=SHORT_LIMIT)
    except RuntimeError as error:
        if scaling != "longrope":
            raise
        # transformers 5.16's longrope frequencies ignore partial_rotary_factor and fail on their own factors.
        pytest.skip(f"this transformers release cannot build longrope RoPE for a partial rotary slice ({error})")
    default, _ = build_pair(max_position_embeddings=SHORT_LIMIT)
    ids = torch.randint(1, 99, (2, 24), generator=torch.Generator().manual_seed(1))
    ours_logits, native_logits = _run(ours, ids).logits, _run(native, ids).logits
    torch.testing.assert_close(ours_logits, native_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours_logits, _run(default, ids).logits, atol=1e-3)  # the scaling did something
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), native.generate(ids, **kwargs))


@pytest.mark.parametrize("scaling", ["dynamic", "yarn"])
def test_the_multimodal_model_accepts_scaled_lengths_as_builtin(scaling):
    from conftest import IMAGE_PAD, build_vl_pair, random_pixels, vision_run

    ours, native = build_vl_pair(rope_parameters=_rope(scaling), max_position_embeddings=SHORT_LIMIT)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[5, 9, *vision_run(4, IMAGE_PAD), *range(10, 30)]])  # 28 tokens
    media = dict(pixel_values=random_pixels(grid.tolist()), image_grid_thw=grid)
    media["mm_token_type_ids"] = (ids == IMAGE_PAD).long()  # built-in needs them with images
    torch.testing.assert_close(_run(ours, ids, **media).logits, _run(native, ids, **media).logits, rtol=1e-4, atol=1e-5)


def test_the_multimodal_model_refuses_unscaled_inputs_past_the_limit():
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**tiny_composite_dict(max_position_embeddings=SHORT_LIMIT)))
    with pytest.raises(ValueError, match="max_position_embeddings=16.*RoPE scaling"):
        _run(model, torch.arange(1, 21)[None])


# --- vision feature getters and outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vl-model", "vl-generation"])
@pytest.mark.parametrize("modality", ["image", "video"])
def test_feature_getters_return_what_builtin_returns(kind, modality):
    """BaseModelOutputWithPooling with per-item pooled features, the tower's hidden states when asked, a tuple for
    return_dict=False; keywords accepted as built-in accepts them."""
    from conftest import build_vl_pair, random_pixels

    ours, native = build_vl_pair(seed=3)
    if kind == "vl-model":
        ours, native = ours.model, native.model
    grid = torch.tensor([[1, 4, 4], [2, 4, 8]])
    pixels = random_pixels(grid.tolist(), seed=5)
    getter = f"get_{modality}_features"
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        mine = getattr(ours, getter)(pixels, grid, **kwargs)
        theirs = getattr(native, getter)(pixels, grid, **kwargs)
        as_tuple = getattr(ours, getter)(pixels, grid, return_dict=False)
    assert type(mine).__name__ == "BaseModelOutputWithPooling"
    assert [f.shape for f in mine.pooler_output] == [f.shape for f in theirs.pooler_output] == [(4, 32), (16, 32)]
    for a, b in zip(mine.pooler_output, theirs.pooler_output):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == ours.config.vision_config.depth + 1
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], mine.last_hidden_state)


@pytest.mark.parametrize("kind", ["vl-model", "vl-generation"])
def test_forward_returns_the_vision_outputs_it_used(kind):
    from conftest import IMAGE_PAD, random_pixels, vision_run

    model = build(kind)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[5, 9, *vision_run(4, IMAGE_PAD), 13]])
    pixels = random_pixels(grid.tolist())
    out = _run(model, ids, pixel_values=pixels, image_grid_thw=grid)
    expected = model.get_image_features(pixels, grid).pooler_output
    assert out.video_outputs is None
    torch.testing.assert_close(out.image_outputs.pooler_output[0], expected[0])
    assert _run(model, IDS).image_outputs is None


def test_feature_getters_need_grids():
    from conftest import random_pixels

    model = build("vl-model")
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.get_image_features(random_pixels([[1, 4, 4]]))


# --- torch.compile --------------------------------------------------------------------------------------------------


def close(actual, expected, msg=None):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=msg)


def test_torch_compile_gives_eager_numbers_forward_and_training_step():
    """torch.compile(model) (inductor, CPU, fp32): logits and loss within 1e-5 of eager (element-wise, absolute and
    relative). Gradients differ from eager by fp32 rounding (~1e-5 of their scale: inductor fuses and reorders
    sums), so they are held to the float64 model: compiled no farther from it than eager fp32 is."""
    import copy

    from conftest import build_pair, relative_error

    model, _ = build_pair(seed=7)
    exact = copy.deepcopy(model).double().train()
    compiled = torch.compile(model)
    ids = torch.randint(1, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        close(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    model.train()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled_loss = compiled(ids, labels=ids).loss
    compiled_loss.backward()
    exact(ids, labels=ids).loss.backward()
    close(compiled_loss, eager_loss)
    for (name, parameter), reference in zip(model.named_parameters(), exact.parameters()):
        eager_error = relative_error(eager_grads[name], reference.grad)
        assert relative_error(parameter.grad, reference.grad) <= 1.5 * eager_error + 1e-6, name
        assert relative_error(parameter.grad, eager_grads[name]) < 1e-4, name


def test_generate_with_a_compiled_forward_gives_eager_tokens():
    """model.forward = torch.compile(model.forward), then generate on transformers' loop and on our static one."""
    from conftest import build_pair

    model, _ = build_pair(seed=8)
    ids = torch.randint(1, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    reference = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward)
    assert torch.equal(model.generate(ids, **kwargs), reference)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), reference)
    assert not type(model)._can_compile_fullgraph  # padding and packing are found from the data (graph breaks)
