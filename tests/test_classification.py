"""Sequence and token classification heads: the Auto factories build ours, and ours equal built-in's (same weights).

The oracle is built-in transformers' head class with built-in's own backbone under it: built-in's heads build their
backbone through ``AutoModel``, which resolves to our classes once this package is registered, so the backbone is
replaced by ``transformers.models.qwen3_5``'s before the weights are loaded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    perturbed_state,
    random_pixels,
    relative_error,
    tiny_composite_dict,
    tiny_text_kwargs,
)
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

import transformers_qwen35
from transformers_qwen35 import Qwen3_5Config, Qwen3_5TextConfig

# (class name, in ours and in built-in; built-in backbone class; composite config?)
HEADS = {
    "text-sequence": ("Qwen3_5TextForSequenceClassification", "Qwen3_5TextModel", False),
    "sequence": ("Qwen3_5ForSequenceClassification", "Qwen3_5Model", True),
    "token": ("Qwen3_5ForTokenClassification", "Qwen3_5Model", True),
}


def build_head_pair(kind: str, num_labels: int = 3, seed: int = 0):
    name, backbone, composite = HEADS[kind]
    torch.manual_seed(seed)
    if composite:
        kwargs = tiny_composite_dict()
        ours_config = Qwen3_5Config(**kwargs, num_labels=num_labels)
        native_config = configuration_qwen3_5.Qwen3_5Config(**kwargs, num_labels=num_labels)
    else:
        kwargs = tiny_text_kwargs()
        ours_config = Qwen3_5TextConfig(**kwargs, num_labels=num_labels)
        native_config = configuration_qwen3_5.Qwen3_5TextConfig(**kwargs, num_labels=num_labels)
    for config in (ours_config, native_config):
        config._attn_implementation = "eager"
        for sub in ("text_config", "vision_config"):
            if hasattr(config, sub):
                getattr(config, sub)._attn_implementation = "eager"
    ours = getattr(transformers_qwen35, name)(ours_config)
    native = getattr(modeling_qwen3_5, name)(native_config)
    native.model = getattr(modeling_qwen3_5, backbone)(native_config)  # built-in's backbone, not ours via AutoModel
    assert type(ours.model).__module__.startswith("transformers_qwen35")
    state = perturbed_state(ours, tied_embedding=None)
    ours.load_state_dict(state)
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in key for key in missing), (missing, unexpected)
    return ours.eval(), native.eval()


def padded_batch():
    """Two rows, the second left-padded and the first right-padded (pad id 0), so the pooled position differs."""
    ids = torch.tensor([[5, 9, 13, 21, 7, 0, 0], [0, 0, 4, 8, 15, 16, 23]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("kind", ["text-sequence", "sequence"])
def test_sequence_classification_matches_builtin(kind):
    ours, native = build_head_pair(kind)
    ids, mask = padded_batch()
    labels = torch.tensor([2, 0])
    mine = ours(input_ids=ids, attention_mask=mask, labels=labels)
    theirs = native(input_ids=ids, attention_mask=mask, labels=labels)
    assert mine.logits.shape == theirs.logits.shape == (2, 3)
    assert relative_error(mine.logits, theirs.logits) < 1e-5
    assert abs(float(mine.loss) - float(theirs.loss)) < 1e-5
    mine.loss.backward()
    theirs.loss.backward()
    native_grads = dict(native.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.grad is not None and native_grads[name].grad is not None:
            assert relative_error(parameter.grad, native_grads[name].grad) < 3e-5, name


def test_reward_model_score_is_read_at_the_last_real_token():
    """One label (a reward model): the score of a padded row equals the score of the same row unpadded."""
    ours, _ = build_head_pair("text-sequence", num_labels=1)
    ids, mask = padded_batch()
    batch = ours(input_ids=ids, attention_mask=mask).logits
    alone = ours(input_ids=ids[1:, 2:]).logits
    assert batch.shape == (2, 1)
    assert relative_error(batch[1], alone[0]) < 1e-5


def test_sequence_classification_with_an_image_matches_builtin():
    ours, native = build_head_pair("sequence")
    grid = [[1, 4, 4]]
    ids = torch.tensor([[5, 9, VISION_START, *[IMAGE_PAD] * 4, VISION_END, 13, 21]])
    inputs = dict(input_ids=ids, pixel_values=random_pixels(grid), image_grid_thw=torch.tensor(grid))
    mine, theirs = ours(**inputs).logits, native(**inputs, mm_token_type_ids=(ids == IMAGE_PAD).long()).logits
    assert relative_error(mine, theirs) < 1e-5
    without_image = ours(input_ids=ids.masked_fill((ids == IMAGE_PAD) | (ids == VISION_START) | (ids == VISION_END), 1))
    assert relative_error(mine, without_image.logits) > 1e-3  # the image reaches the score


def test_token_classification_matches_builtin():
    ours, native = build_head_pair("token")
    ids, mask = padded_batch()
    labels = torch.tensor([[0, 1, 2, 1, 0, -100, -100], [-100, -100, 2, 2, 1, 0, 1]])
    mine = ours(input_ids=ids, attention_mask=mask, labels=labels)
    theirs = native(input_ids=ids, attention_mask=mask, labels=labels)
    assert mine.logits.shape == theirs.logits.shape == (2, 7, 3)
    # Positions that are padding hold no token: what either model writes there is not an output (and differs).
    real = mask.bool()
    assert relative_error(mine.logits[real], theirs.logits[real]) < 1e-5
    assert abs(float(mine.loss) - float(theirs.loss)) < 1e-5


def test_auto_factories_build_our_heads_from_a_causal_lm_checkpoint(tmp_path):
    """The usual start of a reward model: AutoModelForSequenceClassification on a causal-LM checkpoint. The backbone
    comes over, lm_head is dropped without complaint, and the saved classifier holds no LM tensors."""
    from transformers_qwen35 import Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    lm = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**tiny_composite_dict()))
    lm.save_pretrained(tmp_path / "lm")
    assert type(AutoConfig.from_pretrained(tmp_path / "lm")) is Qwen3_5Config

    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    assert type(reward) is transformers_qwen35.Qwen3_5ForSequenceClassification
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(reward.state_dict()[embed], lm.state_dict()[embed])
    reward.save_pretrained(tmp_path / "reward")
    from safetensors import safe_open

    with safe_open(tmp_path / "reward" / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert "score.weight" in keys and not any(key.startswith(("lm_head.", "mtp.")) for key in keys)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    ids = torch.tensor([[5, 9, 13]])
    assert torch.equal(again(input_ids=ids).logits, reward.eval()(input_ids=ids).logits)

    tagger = AutoModelForTokenClassification.from_pretrained(tmp_path / "lm", num_labels=4)
    assert type(tagger) is transformers_qwen35.Qwen3_5ForTokenClassification
    assert tagger(input_ids=ids).logits.shape == (1, 3, 4)


def test_text_configs_get_our_heads_too():
    config = Qwen3_5TextConfig(**tiny_text_kwargs(), num_labels=2)
    assert type(AutoModelForSequenceClassification.from_config(config)) is (
        transformers_qwen35.Qwen3_5TextForSequenceClassification
    )
    tagger = AutoModelForTokenClassification.from_config(config)
    assert type(tagger) is transformers_qwen35.Qwen3_5ForTokenClassification
    assert type(tagger.model) is transformers_qwen35.Qwen3_5TextModel
