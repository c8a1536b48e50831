"""Bad input to the models and configs: each case gets a ValueError that names the problem and the fix, raised before
any compute (issue 18). CLI, chat, processor and media cases live beside their fixtures (test_cli.py,
test_chat_cli.py, test_processor.py, test_media.py); property-based fuzzing is in test_fuzz.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_text_kwargs
from test_transformers_contract import IDS, MODELS, _run, build

from transformers_qwen35 import Qwen3_5TextConfig


@pytest.fixture(params=sorted(MODELS))
def kind(request):
    return request.param


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[5, 99, 3]]), "the id 99, outside this model's vocabulary of 99 ids"),
        (torch.tensor([[5, -1, 3]]), "the id -1, outside"),
        (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
        (torch.tensor([5, 9, 3]), r"\(batch, tokens\)"),
        (torch.tensor([[5.0, 9.0]]), "integer token ids"),
    ],
)
def test_token_ids_the_embedding_cannot_take_are_refused_clearly(kind, ids, message):
    model = build(kind)
    with pytest.raises(ValueError, match=message):
        _run(model, ids)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0, "partial_rotary_factor": 0.5}), "rope_theta"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": -5.0, "partial_rotary_factor": 0.5}), "positive"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    ],
)
def test_configs_that_would_give_nan_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        Qwen3_5TextConfig(**tiny_text_kwargs(**override))


def test_packing_boundaries_that_do_not_increase_are_refused():
    model = build("causal-lm")
    ids = torch.tensor([[5, 9, 13, 21, 7, 3]])
    with pytest.raises(ValueError, match="increase strictly"):
        _run(model, ids, cu_seq_lens_q=torch.tensor([0, 4, 2, 6]), use_cache=False)


@pytest.mark.parametrize(
    "positions, message",
    [(torch.arange(5)[None], r"shape \(1, 5\) but the input is 1 row\(s\) of 6"), (torch.zeros(1, 6), "integer")],
)
def test_position_ids_of_the_wrong_shape_or_type_are_refused(kind, positions, message):
    model = build(kind)
    with pytest.raises(ValueError, match=message):
        _run(model, IDS, position_ids=positions)


def test_a_pad_token_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="pad_token_id is 99, outside the vocabulary of 99"):
        Qwen3_5TextConfig(**tiny_text_kwargs(pad_token_id=99))


def test_float_grids_and_shifted_token_types_are_refused():
    from conftest import IMAGE_PAD, random_pixels, vision_run

    model = build("vl-generation")
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[5, 9, *vision_run(4, IMAGE_PAD), 13]])
    pixels = random_pixels(grid.tolist())
    with pytest.raises(ValueError, match="must hold integers"):
        _run(model, ids, pixel_values=pixels, image_grid_thw=grid.float())
    shifted = torch.roll((ids == IMAGE_PAD).long(), 1, dims=1)
    with pytest.raises(ValueError, match="does not mark the image and video placeholder tokens"):
        _run(model, ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=shifted)
