"""Decoding with fixed-shape state (``generate(..., cache_implementation="static")``): the same tokens as plain
decoding, with and without MTP drafts. On CPU the block forward runs eagerly; tests/gpu replays it as CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    HostSyncs,
    generate_tokens,
    install_exact_fake_fla,
    left_padded_prompts,
    relative_error,
    write_untied_tiny_checkpoint,
)
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from transformers_qwen35.core.cache import Qwen3_5HybridCache
from transformers_qwen35.generation import speculative
from transformers_qwen35.generation.static_decode import StaticHybridCache, forward_block

VOCAB = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_untied_tiny_checkpoint(tmp_path_factory.mktemp("static"), seed=5, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.mark.parametrize("draft_tokens", [0, 1, 3])
def test_static_greedy_equals_plain_decoding(model, draft_tokens):
    ids, mask = left_padded_prompts()
    reference = generate_tokens(model, ids, mask)
    out = generate_tokens(model, ids, mask, cache_implementation="static", mtp_draft_tokens=draft_tokens)
    assert torch.equal(out, reference)


def test_static_sampling_draws_the_same_tokens_as_plain_sampling(model):
    """Without drafts the loop draws one multinomial sample per step from the same scores as transformers' loop, so a
    seeded run repeats plain sampling exactly (processors and all)."""
    ids, mask = left_padded_prompts(seed=1)
    settings = dict(do_sample=True, temperature=0.8, top_k=50, repetition_penalty=1.2)
    torch.manual_seed(3)
    reference = generate_tokens(model, ids, mask, **settings)
    torch.manual_seed(3)
    assert torch.equal(generate_tokens(model, ids, mask, cache_implementation="static", **settings), reference)


def test_static_from_the_generation_config_too(model):
    ids, mask = left_padded_prompts(seed=2)
    reference = generate_tokens(model, ids, mask)
    config = GenerationConfig(max_new_tokens=14, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config), reference)


def test_block_forward_on_the_static_cache_matches_the_dynamic_forward(model):
    """The lean block forward over preallocated buffers (attention over the whole capacity, masked) gives the
    ordinary forward's hidden states, for single tokens and a block of 4, with left padding."""
    ids, mask = left_padded_prompts(seed=3)
    inner = model.model
    with torch.no_grad():
        dynamic = Qwen3_5HybridCache(model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inner(input_ids=ids, attention_mask=mask, position_ids=positions, cache=dynamic, use_cache=True)
        static = StaticHybridCache.from_prefill(dynamic, mask.bool(), 32, model.config)
        position = mask.sum(-1, keepdim=True)
        for length in (1, 4, 1):
            block = torch.randint(0, VOCAB - 4, (3, length))
            block_positions = position + torch.arange(length)
            valid = torch.cat([mask.bool(), torch.ones(3, dynamic.get_seq_length() - 9 + length, dtype=torch.bool)], 1)
            expected = inner(
                input_ids=block, attention_mask=valid, position_ids=block_positions, cache=dynamic, use_cache=True
            ).last_hidden_state
            got = forward_block(model, static, block, block_positions[None].expand(3, -1, -1))
            static.advance(length)
            assert relative_error(got, expected) < 1e-5, length
            position = position + length


@pytest.mark.parametrize("kernels", ["torch", "fla"])
@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_what_the_decoding_graphs_capture_never_waits_for_the_device(model, monkeypatch, kernels, draft_tokens):
    """The block forward that a CUDA graph captures reads no tensor's value on the host (which would fail the capture
    on CUDA), decoding plainly and verifying MTP drafts. On our PyTorch ops, and on fla's path with a stand-in for its
    kernels (conftest): our code around them."""
    calls = []
    if kernels == "fla":
        monkeypatch.setenv("TRANSFORMERS_QWEN35_KERNELS", "fla")
        calls = install_exact_fake_fla(monkeypatch)
    syncs, blocks = HostSyncs(), []

    def watched_block(*args):
        blocks.append(args[2].shape)
        with syncs:
            return forward_block(*args)

    monkeypatch.setattr(speculative, "forward_block", watched_block)
    ids, mask = left_padded_prompts(seed=2)
    generate_tokens(model, ids, mask, cache_implementation="static", mtp_draft_tokens=draft_tokens)
    assert {shape[1] for shape in blocks} == ({1, 3} if draft_tokens else {1})
    assert syncs.found == []
    taken = {kernel for kernel, _, _ in calls}
    assert taken >= {"recurrent", "add_rms_norm", "swiglu"} if kernels == "fla" else not taken


def test_vision_language_model_with_an_image_on_the_static_path(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = model.config
    image = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
    ids = torch.tensor([[5, 6] + image + [7, 8], [0] * 6 + [9, 10, 11, 12]])
    mask = torch.tensor([[1] * 10, [0] * 6 + [1] * 4])
    pixels = torch.randn(16, 1536, generator=torch.Generator().manual_seed(0))
    settings = dict(pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]), max_new_tokens=10)
    reference = generate_tokens(model, ids, mask, **settings)
    for draft_tokens in (0, 2):
        out = generate_tokens(
            model, ids, mask, cache_implementation="static", mtp_draft_tokens=draft_tokens, **settings
        )
        assert torch.equal(out, reference), draft_tokens


def test_static_requests_it_cannot_serve_are_refused(model):
    ids, mask = left_padded_prompts(1)
    with pytest.raises(ValueError, match="cache_implementation='static' cannot be combined with beam search"):
        generate_tokens(model, ids, mask, cache_implementation="static", num_beams=2)


def test_the_static_cache_is_reused_by_the_next_call_that_fits(checkpoint):
    """Capturing CUDA graphs costs as much as many steps: a second call with the same batch size and a prompt that
    fits the buffers decodes on the same cache (refilled, so its tokens are still plain decoding's); a larger
    request, or parameters that moved, get a new one."""
    from transformers_qwen35.generation.static_decode import _CACHES, release_static_cache

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    first_ids, first_mask = left_padded_prompts(seed=4)
    generate_tokens(model, first_ids, first_mask, cache_implementation="static")
    first = _CACHES[model]
    ids, mask = left_padded_prompts(length=6, seed=5)  # another prompt, shorter: fits
    out = generate_tokens(model, ids, mask, cache_implementation="static")
    assert _CACHES[model] is first
    assert torch.equal(out, generate_tokens(model, ids, mask))

    generate_tokens(model, ids, mask, cache_implementation="static", max_new_tokens=first.capacity)  # too long for it
    assert _CACHES[model] is not first and _CACHES[model].capacity > first.capacity
    longer = _CACHES[model]
    generate_tokens(model, ids[:2], mask[:2], cache_implementation="static")  # another batch size
    assert _CACHES[model] is not longer

    second = _CACHES[model]
    model.to(torch.float64).to(torch.float32)  # new parameter storage: graphs would read freed memory
    out = generate_tokens(model, ids[:2], mask[:2], cache_implementation="static")
    assert _CACHES[model] is not second
    assert torch.equal(out, generate_tokens(model, ids[:2], mask[:2]))
    release_static_cache(model)
    assert model not in _CACHES


def test_static_is_the_default_where_cuda_graphs_decode(checkpoint, monkeypatch):
    """On CUDA plain generate() takes the static loop (stood in for here by saying this CPU model decodes on CUDA
    graphs), unless the request needs transformers' loop or asks for it with cache_implementation="dynamic"."""
    from transformers_qwen35.generation import mixin
    from transformers_qwen35.generation.static_decode import _CACHES

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids, mask = left_padded_prompts(seed=6)
    reference = generate_tokens(model, ids, mask)
    assert model not in _CACHES  # on a CPU the default stays transformers' loop
    monkeypatch.setattr(mixin, "_decodes_on_cuda_graphs", lambda model: True)
    for settings in (dict(cache_implementation="dynamic"), dict(num_beams=2), dict(return_dict_in_generate=True)):
        out = generate_tokens(model, ids, mask, **settings)
        assert model not in _CACHES, settings
        if "num_beams" not in settings:
            assert torch.equal(getattr(out, "sequences", out), reference), settings
    model.model.layers[0]._hf_hook = object()  # as accelerate's dispatch over several devices leaves it
    assert torch.equal(generate_tokens(model, ids, mask), reference)
    assert model not in _CACHES
    del model.model.layers[0]._hf_hook
    assert torch.equal(generate_tokens(model, ids, mask), reference)
    assert model in _CACHES


def test_processors_see_the_input_ids_of_transformers_loop(model):
    """Every processor call of the static loop gets the input_ids transformers' own loop gives it, finished rows'
    padding included (rows stop at different steps here)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(input_ids.clone())
            return scores

    ids, mask = left_padded_prompts(seed=7)
    free = generate_tokens(model, ids, mask)
    eos = int(free[2, ids.shape[1] + 4])
    runs = []
    for extra in ({}, dict(cache_implementation="static")):
        recorder = Recorder()
        out = generate_tokens(
            model, ids, mask, eos_token_id=eos, logits_processor=LogitsProcessorList([recorder]), **extra
        )
        runs.append((out, recorder.seen))
    (reference, expected), (out, seen) = runs
    assert (reference == eos).any(dim=1).sum() >= 1 and torch.equal(out, reference)
    assert len(seen) == len(expected)
    for step, (got, want) in enumerate(zip(seen, expected)):
        assert torch.equal(got, want), step


def test_adapter_switches_are_never_replayed_from_a_stale_capture(checkpoint, monkeypatch):
    """A captured graph replays the Python branches of its forward: PEFT adapters switched on or off (same weights,
    same addresses) must give a new capture, and such models keep transformers' loop unless static is asked for."""
    peft = pytest.importorskip("peft")
    from transformers_qwen35.generation import mixin
    from transformers_qwen35.generation.static_decode import _CACHES

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["in_proj_qkv", "o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    ids, mask = left_padded_prompts(seed=8)
    adapted, plain = generate_tokens(model, ids, mask), None
    with model.disable_adapter():
        plain = generate_tokens(model, ids, mask)
    assert not torch.equal(adapted, plain)  # the adapter matters here

    assert torch.equal(generate_tokens(model, ids, mask, cache_implementation="static"), adapted)
    first = _CACHES[base]
    with model.disable_adapter():
        assert torch.equal(generate_tokens(model, ids, mask, cache_implementation="static"), plain)
    assert _CACHES[base] is not first
    assert torch.equal(generate_tokens(model, ids, mask, cache_implementation="static"), adapted)

    monkeypatch.setattr(mixin, "_decodes_on_cuda_graphs", lambda model: True)
    _CACHES.pop(base)
    assert torch.equal(generate_tokens(model, ids, mask), adapted)
    assert base not in _CACHES  # the default keeps transformers' loop for adapted models


def test_a_failed_capture_decodes_without_graphs(monkeypatch):
    from transformers_qwen35.generation import speculative

    class Refused:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(speculative, "GraphedBlock", Refused)
    assert speculative._capture(None, None, 1) is None
