"""Official checkpoint layout: tensor inventory, loading without noise, saving back whole, both directions with
built-in transformers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.qwen3_5 import modeling_qwen3_5

from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5Model
from transformers_qwen35.model.checkpoint import official_tensors, write_random_checkpoint
from transformers_qwen35.model.presets import official_config, tiny_config

# From the official model.safetensors.index.json files: tensor count, total_size, fp32 tensors.
OFFICIAL_INDEX = {
    "0.8B": (488, 1_746_882_752, 36),
    "2B": (632, 4_548_144_832, 36),
    "4B": (738, 9_319_737_856, 48),
    "9B": (775, 19_306_216_416, 48),
}
# Parameters of the text-only causal LM, from the official sizes (reference §3.8).
TEXT_ONLY_PARAMETERS = {"0.8B": 752_393_024, "9B": 8_953_803_264}


@pytest.mark.parametrize("size", sorted(OFFICIAL_INDEX))
def test_inventory_reproduces_the_official_index(size):
    tensors = official_tensors(official_config(size))
    count, total_size, fp32 = OFFICIAL_INDEX[size]
    assert len(tensors) == count
    assert sum(
        torch.Size(shape).numel() * (4 if dtype == torch.float32 else 2) for shape, dtype in tensors.values()
    ) == (total_size)
    assert sum(dtype == torch.float32 for _, dtype in tensors.values()) == fp32


@pytest.mark.parametrize("size", sorted(TEXT_ONLY_PARAMETERS))
def test_module_tree_has_the_official_parameter_count(size):
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(official_config(size).text_config)
    assert model.num_parameters() == TEXT_ONLY_PARAMETERS[size]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("official"), tiny_config(), seed=1)


def _read_all(directory):
    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_official_layout_loads_without_missing_key_noise_and_matches_native(official_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ours = AutoModelForCausalLM.from_pretrained(official_dir, dtype=torch.float32)
    assert type(ours) is Qwen3_5ForCausalLM
    assert not [
        r for r in caplog.records if "missing" in r.getMessage().lower() or "newly initialized" in r.getMessage()
    ]
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied, not random
    native = modeling_qwen3_5.Qwen3_5ForConditionalGeneration.from_pretrained(official_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, native(ids).logits, rtol=1e-5, atol=1e-5)
    assert type(AutoModel.from_pretrained(official_dir)) is Qwen3_5Model  # vision + text, as built-in


def test_save_pretrained_writes_the_official_checkpoint_back(official_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(official_dir, dtype=torch.bfloat16)
    assert model.model.layers[0].linear_attn.A_log.dtype == torch.float32  # kept as stored
    model.save_pretrained(tmp_path)
    original, written = _read_all(official_dir), _read_all(tmp_path)
    assert set(written) == set(original)  # model.visual.* and mtp.* kept
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name], tensor), name
    config = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((official_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["vision_config"] == source["vision_config"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(official_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 11))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reference(ids).logits)


def test_checkpoints_cross_between_us_and_builtin_transformers(tmp_path):
    from conftest import build_pair, relative_error

    ours, native = build_pair(seed=2, tie_word_embeddings=True)
    native.save_pretrained(tmp_path / "native")
    ours.save_pretrained(tmp_path / "ours")
    ids = torch.randint(1, 99, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = native(ids).logits
        loaded_here = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)
        assert type(loaded_here) is Qwen3_5ForCausalLM
        # max-norm relative error, as in the parity tests: elementwise atol near zero logits only measures rounding
        assert relative_error(loaded_here.eval()(ids).logits, reference) < 1e-5
        loaded_there = modeling_qwen3_5.Qwen3_5ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
        assert relative_error(loaded_there.eval()(ids).logits, reference) < 1e-5


def test_official_layout_loads_into_the_vision_language_model(official_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ours = AutoModelForImageTextToText.from_pretrained(official_dir, dtype=torch.float32)
    assert type(ours) is Qwen3_5ForConditionalGeneration
    assert not [
        r for r in caplog.records if "missing" in r.getMessage().lower() or "newly initialized" in r.getMessage()
    ]
    native = modeling_qwen3_5.Qwen3_5ForConditionalGeneration.from_pretrained(official_dir, dtype=torch.float32)
    config = ours.config
    ids = [5, 6, config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id, 7, 8]
    input_ids = torch.tensor([ids])
    types = (input_ids == config.image_token_id).int()
    pixels = torch.randn(16, 1536, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        mine = ours(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid).logits
        theirs = native(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types).logits
    assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_vision_language_model_saves_the_official_checkpoint_back(official_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(official_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    original, written = _read_all(official_dir), _read_all(tmp_path)
    assert set(written) == set(original)  # mtp.* carried back
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name], tensor), name


def test_a_config_that_does_not_describe_the_weights_is_refused_before_allocation(tmp_path):
    """A composite config.json without text_config (so: the 9B defaults, ~36 GB in fp32) over tiny weights: refused
    from the file headers, naming a tensor and both shapes, before a model is built."""
    import json

    import psutil
    from transformers import AutoModelForCausalLM

    from transformers_qwen35.cli.demo import build_demo_checkpoint

    directory = build_demo_checkpoint(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    del config["text_config"]
    (directory / "config.json").write_text(json.dumps(config))
    before = psutil.Process().memory_info().rss
    with pytest.raises(
        ValueError, match=r"model.embed_tokens.weight \[512, 64\] \(config: \[248320, 4096\]\).*text_config"
    ):
        AutoModelForCausalLM.from_pretrained(directory)
    assert psutil.Process().memory_info().rss - before < 2**30  # nothing of the 9B was allocated


def test_a_checkpoint_in_a_subfolder_is_checked_there(tmp_path):
    """from_pretrained(root, subfolder=...) checks (and carries) the subfolder's tensors, not the root's."""
    from transformers_qwen35.cli.demo import build_demo_checkpoint

    build_demo_checkpoint(tmp_path / "root" / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "root", subfolder="model")
    assert model.carried_tensors is not None and model.carried_tensors.files
