"""LoRA with PEFT: target presets, PEFT defaults, training, merging into an official checkpoint, adapters that move
between this package and built-in transformers."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from conftest import IMAGE_PAD, build_pair, build_vl_pair, random_pixels, relative_error, vision_run  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import constants as peft_constants  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5  # noqa: E402

from transformers_qwen35 import Qwen3_5ForCausalLM  # noqa: E402
from transformers_qwen35.model.checkpoint import official_tensors, write_random_checkpoint  # noqa: E402
from transformers_qwen35.model.positions import token_types  # noqa: E402
from transformers_qwen35.model.presets import tiny_config  # noqa: E402
from transformers_qwen35.training.lora import (  # noqa: E402
    PRESETS,
    check_lora_targets,
    lora_target_modules,
    matched_modules,
    register_peft_defaults,
)

# --- the expected sets, written independently of the module under test -------------------------------------------

GROUPS = {
    "attention": ("self_attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "linear_attention": ("linear_attn", {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}),
    "mlp": ("mlp", {"gate_proj", "up_proj", "down_proj"}),
}


def expected_modules(model: nn.Module, preset: str) -> set[str]:
    """By type and path: text groups are the decoder layers' linears by parent block; vision is every linear under
    `visual`; `lm_head` never."""
    chosen = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        parts = name.split(".")
        in_vision = "visual" in parts
        if in_vision:
            if preset in ("vision", "all+vision"):
                chosen.add(name)
            continue
        assert parts[-3].isdigit() and parts[-4] == "layers", name  # every other linear sits in a decoder layer
        for group, (block, leaves) in GROUPS.items():
            if preset in (group, "all", "all+vision") and parts[-2] == block and parts[-1] in leaves:
                chosen.add(name)
    return chosen


def targeted(peft_model) -> set[str]:
    return set(peft_model.base_model.targeted_module_names)


def lora_config(preset: str | None = "all", **kwargs) -> LoraConfig:
    target = {} if preset is None else {"target_modules": lora_target_modules(preset)}
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **target, **kwargs)


def text_ids(seed: int = 0, vocab: int = 95, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- presets --------------------------------------------------------------------------------------------------------

# tiny text stack: 4 layers, 2 DeltaNet + 2 attention; tiny vision tower: 2 blocks of 4 linears + the merger's 2
TEXT_COUNTS = {"attention": 8, "linear_attention": 10, "mlp": 12, "all": 30, "vision": 0, "all+vision": 30}
VL_COUNTS = {**TEXT_COUNTS, "vision": 10, "all+vision": 40}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_select_exactly_their_modules_on_text_and_vl_models(preset):
    ours, native = build_pair()
    ours_vl, native_vl = build_vl_pair()
    for model, counts in ((ours, TEXT_COUNTS), (native, TEXT_COUNTS), (ours_vl, VL_COUNTS), (native_vl, VL_COUNTS)):
        expected = expected_modules(model, preset)
        assert len(expected) == counts[preset]
        assert set(matched_modules(model, lora_target_modules(preset))) == expected
    # what PEFT itself adapts (its own re.fullmatch over the module names), on our and the built-in classes
    for model in (ours, native, ours_vl, native_vl):
        expected = expected_modules(model, preset)
        if not expected:  # "vision" on a text-only model: PEFT refuses, as for any pattern that matches nothing
            with pytest.raises(ValueError, match="not found in the base model"):
                get_peft_model(model, lora_config(preset))
            continue
        peft_model = get_peft_model(model, lora_config(preset))
        assert targeted(peft_model) == expected
        # the same pattern still selects the same layers under PEFT's `base_model.model.` prefix
        assert set(matched_modules(peft_model, lora_target_modules(preset))) == {
            f"base_model.model.{name}" for name in expected
        }


def test_all_preset_never_touches_vision_head_embeddings_conv_or_mtp():
    pattern = lora_target_modules("all")
    for name in (
        "model.visual.blocks.0.mlp.linear_fc1",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.merger.linear_fc2",
        "model.visual.patch_embed.proj",
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.linear_attn.conv1d",
        "mtp.layers.0.self_attn.q_proj",  # the MTP head's attention is not part of the decoder
        "mtp.layers.0.mlp.gate_proj",
        "model.layers.0.self_attn.q_proj.lora_A",
        "model.layers.0.self_attn.q_proj.base_layer",
        "xmodel.layers.0.self_attn.q_proj",
    ):
        assert peft.utils.other.match_target_against_key(pattern, name) is None, name
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.language_model.layers.11.linear_attn.in_proj_a",
        "base_model.model.model.language_model.layers.3.mlp.down_proj",
        "base_model.model.model.layers.2.linear_attn.out_proj",
    ):
        assert peft.utils.other.match_target_against_key(pattern, name), name
    vision = lora_target_modules("vision")
    assert peft.utils.other.match_target_against_key(vision, "model.visual.patch_embed.proj") is None


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        lora_target_modules("qkv")
    message = str(error.value)
    assert "'qkv'" in message
    for name in ("'all'", "'attention'", "'linear_attention'", "'mlp'", "'vision'", "'all+vision'"):
        assert name in message


# --- PEFT defaults --------------------------------------------------------------------------------------------------


def test_peft_has_no_default_for_qwen3_5_without_registration(monkeypatch):
    mapping = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type in ("qwen3_5", "qwen3_5_text"):
        monkeypatch.delitem(mapping, model_type, raising=False)
    ours, _ = build_pair()
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(ours, LoraConfig(task_type="CAUSAL_LM"))


def test_registered_default_adapts_exactly_the_all_set_on_text_and_vl_models():
    assert register_peft_defaults() is True
    assert register_peft_defaults() is True  # idempotent
    mapping = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert mapping["qwen3_5"] == mapping["qwen3_5_text"] == lora_target_modules("all")
    # LoraModel reads the very same dict object
    assert peft.tuners.lora.LoraModel.target_module_mapping is mapping
    ours, native = build_pair()
    ours_vl, native_vl = build_vl_pair()
    for model, model_type in ((ours, "qwen3_5_text"), (native, "qwen3_5_text"), (ours_vl, "qwen3_5"),
                              (native_vl, "qwen3_5")):  # fmt: skip
        assert model.config.model_type == model_type
        expected = expected_modules(model, "all")
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
        assert targeted(peft_model) == expected
        assert not any("visual" in name or name.endswith("conv1d") for name in targeted(peft_model))
        trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
        assert len(trainable) == 2 * len(expected)


def test_register_is_a_no_op_without_peft(monkeypatch):
    for name in ("peft", "peft.utils", "peft.utils.constants"):
        monkeypatch.setitem(sys.modules, name, None)
    assert register_peft_defaults() is False


def _image_inputs(model) -> dict:
    ids = torch.tensor([[5, 6] + vision_run(4, IMAGE_PAD) + [7, 8, 9]])
    inputs = dict(input_ids=ids, pixel_values=random_pixels([[1, 4, 4]], 7), image_grid_thw=torch.tensor([[1, 4, 4]]))
    if type(model).__module__.startswith("transformers."):
        inputs["mm_token_type_ids"] = token_types(ids, IMAGE_PAD, IMAGE_PAD + 1)
    return inputs


# --- training -------------------------------------------------------------------------------------------------------


def train(peft_model, steps: int = 3, lr: float = 0.5, seed: int = 0, **inputs) -> None:
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    input_ids = inputs.pop("input_ids", None)
    if input_ids is None:
        input_ids = text_ids(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = peft_model(input_ids=input_ids, labels=input_ids, **inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    peft_model.eval()


@pytest.mark.parametrize("vl", [False, True], ids=["text", "vl"])
def test_training_changes_only_the_adapter_weights(vl):
    ours = build_vl_pair()[0] if vl else build_pair()[0]
    preset = "all+vision" if vl else "all"
    expected = expected_modules(ours, preset)
    before = {name: value.clone() for name, value in ours.state_dict().items()}
    peft_model = get_peft_model(ours, lora_config(preset))
    initial = {name: value.clone() for name, value in peft_model.state_dict().items()}
    inputs = _image_inputs(ours) if vl else {"input_ids": text_ids(1)}
    with torch.no_grad():
        logits_before = peft_model(**inputs).logits
    train(peft_model, steps=3, **inputs)  # with an image on the VL model, so the vision adapters train too
    with torch.no_grad():
        logits_after = peft_model(**inputs).logits
    assert relative_error(logits_after, logits_before) > 1e-3  # the adapters learned something

    adapters = set()
    for name, value in peft_model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            adapters.add(name)
            # lora_B starts at zero, so the first step moves only B; from the second step A moves as well
            assert not torch.equal(value, initial[name]), name
        else:
            original = name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
            assert torch.equal(value, before[original]), name  # bit-identical
            assert torch.equal(value, initial[name]), name
    assert len(adapters) == 2 * len(expected)
    assert {name.split(".lora_")[0].replace("base_model.model.", "", 1) for name in adapters} == expected


# --- merge, save, load into built-in transformers -------------------------------------------------------------------


def _read_all(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_merged_model_saves_an_official_checkpoint_that_builtin_transformers_loads(tmp_path):
    config = tiny_config()
    source = write_random_checkpoint(tmp_path / "official", config, seed=3)
    ours = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert type(ours) is Qwen3_5ForCausalLM and ours.config.model_type == "qwen3_5_text"
    peft_model = get_peft_model(ours, lora_config("all"))
    ids = text_ids(4, vocab=1000, shape=(2, 17))
    train(peft_model, steps=3, lr=2.0, input_ids=ids)
    with torch.no_grad():
        adapted = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is Qwen3_5ForCausalLM
    assert not any("lora" in name or "base_layer" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert relative_error(merged_logits, adapted) < 1e-5

    merged.save_pretrained(tmp_path / "merged")
    original, written = _read_all(source), _read_all(tmp_path / "merged")
    assert set(written) == set(original) == set(official_tensors(config))  # official names, vision and MTP kept
    for name, tensor in original.items():
        if name.startswith(("model.visual.", "mtp.")):
            assert torch.equal(written[name], tensor), name  # carried unchanged
    merged_weight = merged.model.layers[0].linear_attn.in_proj_qkv.weight
    stored = written["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"]
    assert torch.equal(stored.float(), merged_weight)  # the merged weight, not the source's
    assert not torch.equal(
        stored.float(), original["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"].float()
    )

    with torch.no_grad():
        builtin_vl, info_vl = modeling_qwen3_5.Qwen3_5ForConditionalGeneration.from_pretrained(
            tmp_path / "merged", dtype=torch.float32, output_loading_info=True
        )
        builtin_text, info_text = modeling_qwen3_5.Qwen3_5ForCausalLM.from_pretrained(
            tmp_path / "merged", dtype=torch.float32, output_loading_info=True
        )
        assert not info_vl["missing_keys"] and not info_text["missing_keys"]
        errors = {
            "builtin Qwen3_5ForConditionalGeneration": relative_error(builtin_vl.eval()(ids).logits, merged_logits),
            "builtin Qwen3_5ForCausalLM": relative_error(builtin_text.eval()(ids).logits, merged_logits),
            "ours reloaded": relative_error(
                AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits,
                merged_logits,
            ),
        }
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
    print("merged-checkpoint relative logit errors:", errors, "adapter effect:", relative_error(merged_logits, base))
    assert relative_error(merged_logits, base) > 1e-2  # the merge is visible in the logits
    for where, error in errors.items():
        assert error < 1e-5, (where, error)


# --- adapters move between our classes and built-in transformers ----------------------------------------------------


def _logits(model, vl: bool) -> torch.Tensor:
    with torch.no_grad():
        if vl:
            return model(**_image_inputs(getattr(model, "get_base_model", lambda: model)())).logits
        return model(text_ids(5)).logits


@pytest.mark.parametrize("direction", ["ours_to_builtin", "builtin_to_ours"])
@pytest.mark.parametrize("vl", [False, True], ids=["text", "vl"])
def test_adapters_move_between_ours_and_builtin(tmp_path, direction, vl):
    ours, native = build_vl_pair(seed=6) if vl else build_pair(seed=6)
    trainer_base, loader_base = (ours, native) if direction == "ours_to_builtin" else (native, ours)
    preset = "all+vision" if vl else "all"
    expected = expected_modules(loader_base, preset)
    base_logits = _logits(loader_base, vl)
    trained = get_peft_model(trainer_base, lora_config(preset))
    train(trained, steps=3, lr=0.5, **(_image_inputs(trainer_base) if vl else {}))
    trained.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(loader_base, tmp_path / "adapter")
    assert targeted(loaded) == targeted(trained) == expected
    reference = _logits(trained, vl)
    error = relative_error(_logits(loaded, vl), reference)
    print(f"{direction} ({'vl' if vl else 'text'}): adapter logits relative error {error:.2e}")
    assert error < 1e-5
    assert relative_error(reference, base_logits) > 1e-3  # the adapter matters
    # and both sides write the same adapter file
    fresh = (build_vl_pair if vl else build_pair)(seed=6)[1 if direction == "ours_to_builtin" else 0]
    again = get_peft_model(fresh, lora_config(preset))
    again.save_pretrained(tmp_path / "other")
    assert set(_read_all(tmp_path / "adapter")) == set(_read_all(tmp_path / "other"))


# --- errors ---------------------------------------------------------------------------------------------------------


def test_check_lora_targets_reports_patterns_that_match_nothing():
    ours, _ = build_pair()
    assert set(check_lora_targets(ours, lora_target_modules("all"))) == expected_modules(ours, "all")
    with pytest.raises(ValueError) as error:
        check_lora_targets(ours, lora_target_modules("vision"))
    message = str(error.value)
    assert lora_target_modules("vision") in message and "matches no module" in message
    assert "model.layers.N.linear_attn.in_proj_qkv" in message and "model.layers.N.self_attn.q_proj" in message

    # a Qwen3-Next name in a list: PEFT adapts the other entries and says nothing; the check names it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        silent = get_peft_model(build_pair()[0], LoraConfig(target_modules=["q_proj", "in_proj_qkvz"]))
    assert targeted(silent) == {name for name in expected_modules(ours, "attention") if name.endswith("q_proj")}
    with pytest.raises(ValueError, match=r"'in_proj_qkvz' matches no module of Qwen3_5ForCausalLM"):
        check_lora_targets(ours, ["q_proj", "in_proj_qkvz"])
    assert set(check_lora_targets(ours, ["q_proj", "in_proj_qkv"])) == {
        n for n in expected_modules(ours, "all") if n.endswith(("q_proj", "in_proj_qkv"))
    }
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check_lora_targets(ours, "model.layers.(")


def test_peft_itself_raises_a_value_error_without_module_names_when_nothing_matches():
    ours, _ = build_pair()
    with pytest.raises(ValueError, match=r"Target modules \{'in_proj_qkvz'\} not found in the base model") as error:
        get_peft_model(ours, LoraConfig(target_modules=["in_proj_qkvz"]))
    assert isinstance(error.value, peft.utils.error.NoMatchingPeftModuleError)
    assert "in_proj_qkv'" not in str(error.value)  # PEFT does not show what exists: hence check_lora_targets
