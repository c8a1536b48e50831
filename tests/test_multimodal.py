"""The vision-language model against built-in transformers' Qwen3_5ForConditionalGeneration (identical weights)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_PAD,
    VIDEO_PAD,
    build_vl_pair,
    random_pixels,
    relative_error,
    vision_run,
)

from transformers_qwen35.model.positions import token_types

IMAGE_GRID = [[1, 4, 4], [1, 2, 6]]  # 4 and 3 merged tokens
VIDEO_GRID = [[2, 4, 6]]  # two temporal groups of 6 merged tokens


def image_video_prompt() -> list[int]:
    """Text, two images, then a video whose two frame groups are separated by timestamp text, then text."""
    return (
        [5, 6, 7] + vision_run(4, IMAGE_PAD) + [8] + vision_run(3, IMAGE_PAD) + [9, 10]
        + [11, 12] + vision_run(6, VIDEO_PAD) + [13, 12] + vision_run(6, VIDEO_PAD) + [14, 15, 16]
    )  # fmt: skip


def vision_inputs(images=IMAGE_GRID, videos=VIDEO_GRID) -> dict:
    inputs = {}
    if images:
        inputs.update(pixel_values=random_pixels(images, 1), image_grid_thw=torch.tensor(images))
    if videos:
        inputs.update(pixel_values_videos=random_pixels(videos, 2), video_grid_thw=torch.tensor(videos))
    return inputs


def types_of(input_ids: torch.Tensor) -> torch.Tensor:
    return token_types(input_ids, IMAGE_PAD, VIDEO_PAD)


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def vl_pair(request):
    return build_vl_pair(seed=3, attn_implementation=request.param, tie_word_embeddings=True)


def test_image_and_video_logits_match_builtin(vl_pair):
    ours, native = vl_pair
    input_ids = torch.tensor([image_video_prompt()])
    inputs = vision_inputs()
    with torch.no_grad():
        expected = native(input_ids=input_ids, mm_token_type_ids=types_of(input_ids), **inputs).logits
        # the model derives mm_token_type_ids from the placeholder ids when they are not given
        derived = ours(input_ids=input_ids, **inputs).logits
        given = ours(input_ids=input_ids, mm_token_type_ids=types_of(input_ids), **inputs).logits
    assert relative_error(derived, expected) < 1e-5
    assert torch.equal(derived, given)


def test_vision_features_match_builtin(vl_pair):
    ours, native = vl_pair
    inputs = vision_inputs()
    with torch.no_grad():
        mine = ours.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        theirs = native.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert [tuple(f.shape) for f in mine] == [(4, 32), (3, 32)]
    for a, b in zip(mine, theirs):
        assert relative_error(a, b) < 1e-5


def test_gradients_match_builtin():
    ours, native = build_vl_pair(seed=4, attn_implementation="eager")
    input_ids = torch.tensor([image_video_prompt()])
    labels = input_ids.clone()
    labels[:, :3] = -100
    inputs = vision_inputs()
    ours.train()
    native.train()
    loss_ours = ours(input_ids=input_ids, labels=labels, **inputs).loss
    loss_native = native(input_ids=input_ids, labels=labels, mm_token_type_ids=types_of(input_ids), **inputs).loss
    loss_ours.backward()
    loss_native.backward()
    assert abs(loss_ours.item() - loss_native.item()) < 1e-5 * abs(loss_native.item())
    theirs = dict(native.named_parameters())
    checked = 0
    for name, parameter in ours.named_parameters():
        reference = theirs[name].grad
        if reference is None or reference.abs().max() == 0:
            continue
        assert relative_error(parameter.grad, reference) < 3e-5, name
        checked += name.startswith("model.visual.")
    assert checked >= 10  # the vision tower's gradients were compared too


def test_batch_mixing_text_only_and_image_rows_with_left_padding(vl_pair):
    """Each row of a left-padded batch (text only, image, image + video) equals that row run alone."""
    ours, native = vl_pair
    rows = [
        [5, 6, 7, 8, 9],
        [5] + vision_run(4, IMAGE_PAD) + [6, 7],
        [5, 6] + vision_run(3, IMAGE_PAD) + [7] + vision_run(6, VIDEO_PAD) + [8] + vision_run(6, VIDEO_PAD) + [9],
    ]
    per_row_inputs = [{}, vision_inputs(images=[[1, 4, 4]], videos=None), vision_inputs(images=[[1, 2, 6]])]
    per_row_inputs[2]["pixel_values"] = random_pixels([[1, 2, 6]], 5)
    per_row_inputs[1]["pixel_values"] = random_pixels([[1, 4, 4]], 6)
    input_ids, mask = left_padded(rows)
    batch_inputs = {
        "pixel_values": torch.cat([per_row_inputs[1]["pixel_values"], per_row_inputs[2]["pixel_values"]]),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 6]]),
        "pixel_values_videos": per_row_inputs[2]["pixel_values_videos"],
        "video_grid_thw": per_row_inputs[2]["video_grid_thw"],
    }
    with torch.no_grad():
        batched = ours(input_ids=input_ids, attention_mask=mask, **batch_inputs).logits
        native_batched = native(
            input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types_of(input_ids), **batch_inputs
        ).logits
        for index, (row, extra) in enumerate(zip(rows, per_row_inputs)):
            alone = ours(input_ids=torch.tensor([row]), **extra).logits[0]
            assert relative_error(batched[index, -len(row) :], alone) < 1e-5, index
    real = mask.bool()
    assert relative_error(batched[real], native_batched[real]) < 1e-5


def test_greedy_generation_matches_builtin(vl_pair):
    ours, native = vl_pair
    rows = [[5] + vision_run(4, IMAGE_PAD) + [6, 7], [5, 6, 8, 9, 7, 7, 6, 5, 4]]
    input_ids, mask = left_padded(rows)
    inputs = vision_inputs(images=[[1, 4, 4]], videos=None)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = ours.generate(input_ids=input_ids, attention_mask=mask, **inputs, **settings)
        theirs = native.generate(
            input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types_of(input_ids), **inputs, **settings
        )
    assert torch.equal(mine, theirs)


def test_beam_search_and_several_returns_match_builtin(vl_pair):
    ours, native = vl_pair
    input_ids = torch.tensor([[5, 6] + vision_run(3, IMAGE_PAD) + [7] + vision_run(6, VIDEO_PAD) + [8]])
    video = [[1, 4, 6]]
    inputs = vision_inputs(images=[[1, 2, 6]], videos=video)
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = ours.generate(input_ids=input_ids, **inputs, **settings)
        theirs = native.generate(input_ids=input_ids, mm_token_type_ids=types_of(input_ids), **inputs, **settings)
    assert torch.equal(mine, theirs)


def test_cached_decoding_continues_multimodal_positions(vl_pair):
    """Prefill with images, then one token at a time through the cache = one full forward."""
    ours, _ = vl_pair
    prompt = image_video_prompt()
    continuation = [20, 21, 22]
    inputs = vision_inputs()
    with torch.no_grad():
        full = ours(input_ids=torch.tensor([prompt + continuation]), **inputs).logits[0, len(prompt) - 1 :]
        out = ours(input_ids=torch.tensor([prompt]), use_cache=True, **inputs)
        steps = [out.logits[0, -1]]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for token in continuation:
            out = ours(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            steps.append(out.logits[0, -1])
    assert relative_error(torch.stack(steps), full) < 1e-5
    assert cache.rope_deltas is not None and int(cache.rope_deltas[0, 0]) < 0  # images took fewer positions


def test_generate_twice_with_different_images_keeps_rows_apart(vl_pair):
    """Rope offsets live in each call's cache, not on the model: a second generate is not affected by the first."""
    ours, native = vl_pair
    first = torch.tensor([[5] + vision_run(4, IMAGE_PAD) + [6]])
    second = torch.tensor([[7, 8, 9, 10]])
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours.generate(input_ids=first, **vision_inputs(images=[[1, 4, 4]], videos=None), **settings)
        after = ours.generate(input_ids=second, **settings)
        fresh = native.generate(input_ids=second, **settings)
    assert torch.equal(after, fresh)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(input_ids=torch.tensor([[5] + vision_run(3, IMAGE_PAD) + [6]])),
            "placeholder tokens but the images give",
        ),
        (dict(pixel_values=torch.randn(16, 4 * 2 * 16 * 16)), "Images must be RGB"),
        (dict(pixel_values=torch.randn(12, 1536)), "describes 16"),
        (dict(image_grid_thw=torch.tensor([[1, 3, 4]])), "multiples of 2"),
        (dict(pixel_values=None, image_grid_thw=None), "no pixel_values were given"),
    ],
)
def test_bad_vision_inputs_raise_before_any_compute(vl_pair, change, message, monkeypatch):
    ours, _ = vl_pair
    calls = []
    monkeypatch.setattr(ours.model.visual, "forward", lambda *a, **k: calls.append(1))
    inputs = dict(input_ids=torch.tensor([[5] + vision_run(4, IMAGE_PAD) + [6]]))
    inputs.update(vision_inputs(images=[[1, 4, 4]], videos=None))
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        ours(**inputs)
    assert not calls


def test_text_longer_than_the_position_limit_is_refused(vl_pair):
    ours, _ = vl_pair
    limit = ours.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(input_ids=torch.zeros(1, limit + 1, dtype=torch.long))


def test_placeholder_runs_must_match_grids(vl_pair):
    ours, _ = vl_pair
    # right total (4 + 3 = 7 tokens) but split 5 + 2, so the runs do not fit the grids
    ids = torch.tensor([[5] + vision_run(5, IMAGE_PAD) + [6] + vision_run(2, IMAGE_PAD)])
    with pytest.raises(ValueError, match="run of 5 image placeholder tokens"):
        ours(input_ids=ids, **vision_inputs(videos=None))


def test_bfloat16_is_as_accurate_as_builtin():
    """Half precision: fp32 pixels into a bf16 tower, features scattered into bf16 embeddings. Both bf16 models are
    compared with the fp32 result; ours must not be noticeably further from it than built-in transformers."""
    ours, native = build_vl_pair(seed=5, attn_implementation="sdpa")
    input_ids = torch.tensor([image_video_prompt()])
    inputs = vision_inputs()  # fp32, as the processor returns them
    types = types_of(input_ids)
    with torch.no_grad():
        reference = native(input_ids=input_ids, mm_token_type_ids=types, **inputs).logits
        mine = ours.to(torch.bfloat16)(input_ids=input_ids, **inputs).logits
        theirs = native.to(torch.bfloat16)(input_ids=input_ids, mm_token_type_ids=types, **inputs).logits
    assert mine.dtype == torch.bfloat16
    assert relative_error(mine.float(), reference) < 1.5 * relative_error(theirs.float(), reference)


def test_activation_checkpointing_with_images_matches_plain_backward():
    """The recomputed forward must not reuse a cache (it would see its own keys twice): same gradients as without."""
    ours, _ = build_vl_pair(seed=6, attn_implementation="sdpa")
    input_ids = torch.tensor([image_video_prompt()])
    inputs = vision_inputs()
    ours.train()
    ours(input_ids=input_ids, labels=input_ids, **inputs).loss.backward()
    plain = {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad(set_to_none=True)
    ours.gradient_checkpointing_enable()
    ours(input_ids=input_ids, labels=input_ids, use_cache=True, **inputs).loss.backward()
    for name, parameter in ours.named_parameters():
        if name in plain:
            assert relative_error(parameter.grad, plain[name]) < 1e-5, name
