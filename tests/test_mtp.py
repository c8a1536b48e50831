"""Self-speculative decoding with the checkpoint's MTP head (``generate(..., mtp_draft_tokens=K)``).

The oracle is plain decoding (``mtp_draft_tokens=0``, transformers' own loop): greedy output must be identical, the
states after a partial acceptance must be those of a run over the kept tokens only, sampling must keep the model's
distribution. Random weights accept few drafts, so acceptance is also driven on purpose: a scripted drafter that
proposes the true continuation with chosen mistakes, and an MTP head set to repeat its input token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    generate_tokens,
    install_exact_fake_fla,
    left_padded_prompts,
    relative_error,
    write_untied_tiny_checkpoint,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

from transformers_qwen35.core.cache import Qwen3_5HybridCache
from transformers_qwen35.generation import speculative
from transformers_qwen35.kernels import dispatch as kernels
from transformers_qwen35.model.checkpoint import write_random_checkpoint
from transformers_qwen35.model.mtp import mtp_head
from transformers_qwen35.model.presets import tiny_config

VOCAB = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_untied_tiny_checkpoint(tmp_path_factory.mktemp("mtp"), seed=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _scripted_drafts(monkeypatch, reference, prompt_length, mistakes):
    """Replace the MTP drafts with the reference continuation, wrong wherever ``mistakes(row, round, j)`` says."""
    rounds = {}

    def draft(run, k):
        batch = run.prompt.shape[0]
        if not k:
            return torch.zeros(batch, 0, dtype=torch.long), None
        drafts = torch.empty(batch, k, dtype=torch.long)
        for row in range(batch):
            done = int(run.count[row])
            count = rounds[row] = rounds.get(row, -1) + 1
            for j in range(k):
                index = prompt_length + done + j
                token = int(reference[row, index]) if index < reference.shape[1] else 0
                drafts[row, j] = (token + 1) % VOCAB if mistakes(row, count, j) else token
        scores = torch.full((batch, k, VOCAB), -1e4)
        scores.scatter_(2, drafts[..., None], 0.0)
        return drafts, scores

    monkeypatch.setattr(speculative._Run, "draft", draft)


# --- the head -------------------------------------------------------------------------------------------------------


def test_the_head_is_built_from_the_checkpoint_and_stays_out_of_the_model(model, checkpoint):
    parameters = model.num_parameters()
    head = mtp_head(model)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        names = [name for name in handle.keys() if name.startswith("mtp.")]
        assert len(names) == 15
        for name in names:
            assert torch.equal(head.state_dict()[name[len("mtp.") :]], handle.get_tensor(name).float()), name
    assert model.num_parameters() == parameters
    assert not [name for name in model.state_dict() if "mtp" in name]
    assert mtp_head(model) is head  # built once


def test_a_model_without_mtp_weights_says_so_before_any_compute(checkpoint):
    from transformers_qwen35 import Qwen3_5ForCausalLM

    bare = Qwen3_5ForCausalLM(tiny_config(vocab_size=VOCAB).text_config).eval()
    ids, mask = left_padded_prompts(1)
    with pytest.raises(ValueError, match=r"mtp\.\* tensors.*mtp_draft_tokens=0"):
        bare.generate(ids, attention_mask=mask, max_new_tokens=3, mtp_draft_tokens=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mtp_draft_tokens=-1), "non-negative integer"),
        (dict(mtp_draft_tokens=2, num_beams=2), "beam search"),
        (dict(mtp_draft_tokens=2, output_scores=True, return_dict_in_generate=True), "output_scores"),
        (dict(mtp_draft_tokens=2, inputs_embeds=torch.zeros(1, 9, 64)), "input_ids"),
    ],
)
def test_requests_it_cannot_serve_are_refused_clearly(model, kwargs, message):
    ids, mask = left_padded_prompts(1)
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, ids, mask, **kwargs)


# --- lossless greedy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 4])
def test_greedy_output_equals_plain_decoding(model, batch, draft_tokens):
    ids, mask = left_padded_prompts(batch)
    reference = generate_tokens(model, ids, mask)
    out = generate_tokens(model, ids, mask, mtp_draft_tokens=draft_tokens)
    assert torch.equal(out, reference)
    stats = model.mtp_stats
    assert stats.draft_tokens == draft_tokens and stats.rounds >= 1


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_partial_acceptance_in_every_pattern_keeps_greedy_output(model, monkeypatch, draft_tokens):
    """Rows accept different counts in the same round (0..K, changing every round): the kept states, masked
    attention holes and per-row positions must give exactly plain decoding."""
    ids, mask = left_padded_prompts(3, seed=1)
    reference = generate_tokens(model, ids, mask, max_new_tokens=20)

    def mistakes(row, count, j):  # row 0 always right, the others wrong at a row- and round-dependent draft
        return row > 0 and j == (row + count) % (draft_tokens + 1)

    _scripted_drafts(monkeypatch, reference, ids.shape[1], mistakes)
    out = generate_tokens(model, ids, mask, max_new_tokens=20, mtp_draft_tokens=draft_tokens)
    assert torch.equal(out, reference)
    stats = model.mtp_stats
    assert 0 < stats.accepted < stats.drafted
    assert stats.tokens_per_pass > 1.0


def test_a_head_that_drafts_well_is_accepted_and_stays_lossless(checkpoint):
    """The real head, set to predict its input token again: drafts are often right on a model that repeats."""
    config = tiny_config(vocab_size=VOCAB)  # tied: greedy decoding settles on repeating a token
    directory = write_random_checkpoint(checkpoint.parent / "tied", config, seed=4)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    head = mtp_head(model)
    with torch.no_grad():
        h = config.text_config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :h] = torch.eye(h)
        head.layers[0].self_attn.o_proj.weight.zero_()
        head.layers[0].mlp.down_proj.weight.zero_()
    ids, mask = left_padded_prompts(2, seed=2)
    reference = generate_tokens(model, ids, mask, max_new_tokens=24)
    out = generate_tokens(model, ids, mask, max_new_tokens=24, mtp_draft_tokens=3)
    assert torch.equal(out, reference)
    assert model.mtp_stats.acceptance_rate > 0.5


def test_stopping_at_eos_and_processors_that_read_the_context(model):
    """A stop token mid-round, repetition penalty and min_new_tokens see the context plain decoding shows them."""
    ids, mask = left_padded_prompts(3, seed=3)
    free = generate_tokens(model, ids, mask)
    eos = int(free[1, ids.shape[1] + 5])  # row 1's sixth new token: rows stop at different steps
    settings = dict(eos_token_id=eos, repetition_penalty=1.3, min_new_tokens=2, max_new_tokens=14)
    reference = generate_tokens(model, ids, mask, **settings)
    assert (reference == eos).any()
    for draft_tokens in (1, 3):
        assert torch.equal(generate_tokens(model, ids, mask, mtp_draft_tokens=draft_tokens, **settings), reference)
    # The static cache too: without drafts its lean loop (one late check per step), with drafts the general one.
    for draft_tokens in (0, 2):
        out = generate_tokens(
            model, ids, mask, mtp_draft_tokens=draft_tokens, cache_implementation="static", **settings
        )
        assert torch.equal(out, reference), draft_tokens
    # Streamed step by step (stopped rows get padding), as transformers streams them.
    plain, lean = _Collect(), _Collect()
    generate_tokens(model, ids, mask, streamer=plain, **settings)
    generate_tokens(model, ids, mask, streamer=lean, cache_implementation="static", **settings)
    assert len(lean.values) == len(plain.values)
    assert all(a == b if isinstance(a, str) else torch.equal(a, b) for a, b in zip(lean.values, plain.values))


def test_stop_strings_style_criteria_run_on_each_kept_token(model):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    ids, mask = left_padded_prompts(2, seed=4)
    free = generate_tokens(model, ids, mask)
    token = int(free[0, ids.shape[1] + 3])
    criteria = StoppingCriteriaList([StopAfterToken(token)])
    reference = generate_tokens(model, ids, mask, stopping_criteria=criteria)
    out = generate_tokens(model, ids, mask, stopping_criteria=criteria, mtp_draft_tokens=2)
    assert torch.equal(out, reference)


class _Collect(BaseStreamer):
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.values.append("end")


@pytest.mark.parametrize("settings", [dict(mtp_draft_tokens=3), dict(cache_implementation="static")])
def test_a_streamer_receives_the_tokens_of_plain_decoding(model, settings):
    ids, mask = left_padded_prompts(1, seed=5)
    plain, fast = _Collect(), _Collect()
    generate_tokens(model, ids, mask, streamer=plain)
    generate_tokens(model, ids, mask, streamer=fast, **settings)
    assert fast.values[-1] == "end" and plain.values[-1] == "end"
    assert torch.equal(fast.values[0], plain.values[0])  # the prompt
    flat = lambda values: torch.cat([v.reshape(-1) for v in values[1:-1]]).tolist()  # noqa: E731
    assert flat(fast.values) == flat(plain.values)


def test_lossless_on_the_fla_call_path(model, monkeypatch):
    """The same loop through fla's entry points (a fake fla on our exact ops checks every call's arguments): the
    verification pass and the state rollback run fla's fused recurrent kernel with an initial state."""
    ids, mask = left_padded_prompts(2, seed=8)
    reference = generate_tokens(model, ids, mask)
    calls = install_exact_fake_fla(monkeypatch)
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    for draft_tokens in (1, 3):
        assert torch.equal(generate_tokens(model, ids, mask, mtp_draft_tokens=draft_tokens), reference)
    assert ("recurrent", 4, False) in calls and ("conv", 4, False) in calls
    kernels._load_fla.cache_clear()


def test_drafting_pauses_while_drafts_do_not_pay_and_resumes_when_they_do():
    schedule = speculative.DraftSchedule(enabled=True)
    pattern = []
    for accepted in [0.0, 0.0, 0.0, 0.0, 2.0, 0.0]:
        while not schedule.drafting():
            pattern.append("-")
        pattern.append("d")
        schedule.update(accepted)
    # poor rounds pause drafting for 1, 2, 4, 8 rounds; a good one resets the pause to 1
    assert "".join(pattern) == "d-d--d----d--------dd"
    assert not speculative.DraftSchedule(enabled=False).drafting()


def test_random_heads_drafts_are_mostly_skipped_and_output_is_unchanged(model):
    ids, mask = left_padded_prompts(1, seed=9)
    reference = generate_tokens(model, ids, mask, max_new_tokens=40)
    assert torch.equal(generate_tokens(model, ids, mask, max_new_tokens=40, mtp_draft_tokens=2), reference)
    stats = model.mtp_stats
    assert stats.accepted == 0  # random weights: the head never agrees here
    assert stats.drafted // 2 < stats.rounds / 3  # most rounds ran without drafts


# --- the states a partial acceptance leaves -------------------------------------------------------------------------


def test_keep_speculated_leaves_the_states_of_the_kept_tokens_only(model):
    """Verify 5 tokens at once, keep 1, 3 and 5 of them per row: every state equals a run over exactly the kept
    tokens, and the next token's logits agree with attention holes masked."""
    torch.manual_seed(0)
    prompt = torch.randint(0, VOCAB - 4, (3, 7))
    block = torch.randint(0, VOCAB - 4, (3, 5))
    kept = torch.tensor([1, 3, 5])
    inner = model.model
    with torch.no_grad():
        cache = Qwen3_5HybridCache(model.config)
        inner(input_ids=prompt, cache=cache, use_cache=True)
        cache.speculating = True
        inner(input_ids=block, cache=cache, use_cache=True)
        cache.speculating = False
        cache.keep_speculated(kept)
        assert cache.get_seq_length() == 7 + 5
        alone = []
        for row in range(3):
            alone.append(Qwen3_5HybridCache(model.config))
            inner(input_ids=torch.cat([prompt[row], block[row, : kept[row]]])[None], cache=alone[row], use_cache=True)
            for layer, is_linear in enumerate(cache.is_linear):
                if is_linear:
                    assert relative_error(cache.conv_states[layer][row], alone[row].conv_states[layer][0]) < 1e-5
                    assert (
                        relative_error(cache.recurrent_states[layer][row], alone[row].recurrent_states[layer][0]) < 1e-5
                    )
        follow = torch.randint(0, VOCAB - 4, (3, 1))
        holes = torch.cat([torch.ones(3, 7, dtype=torch.bool), torch.arange(5)[None] < kept[:, None]], 1)
        logits = model(
            input_ids=follow, attention_mask=torch.cat([holes, torch.ones(3, 1, dtype=torch.bool)], 1),
            position_ids=7 + kept[:, None], cache=cache, use_cache=True,
        ).logits[:, -1]  # fmt: skip
        for row in range(3):
            expected = model(input_ids=follow[row : row + 1], cache=alone[row], use_cache=True).logits[0, -1]
            assert relative_error(logits[row], expected) < 1e-5, row


def test_the_heads_cache_matches_running_it_from_scratch(model, monkeypatch):
    """After every round, the head's draft input equals the head run afresh over the whole committed sequence."""
    captured = []
    original_round = speculative._Run.round

    def round_and_capture(run):
        original_round(run)
        captured.append((run.prompt.clone(), run.generated.clone(), run.count.clone(), run.mtp_out.clone()))

    monkeypatch.setattr(speculative._Run, "round", round_and_capture)
    ids, mask = left_padded_prompts(2, seed=6)
    _scripted_drafts(
        monkeypatch, generate_tokens(model, ids, mask), ids.shape[1], lambda row, count, j: row == 1 and j == 1
    )
    generate_tokens(model, ids, mask, mtp_draft_tokens=2)
    head, inner = mtp_head(model), model.model
    assert len(captured) >= 3
    for prompt, generated, count, mtp_out in captured:
        for row in range(2):
            if count[row] >= 14:
                continue  # the last round may run past max_new_tokens; what it kept is cut
            tokens = torch.cat([prompt[row][mask[row].bool()], generated[row, : count[row]]])[None]
            with torch.no_grad():
                hidden = inner(input_ids=tokens[:, :-1]).last_hidden_state
                positions = torch.arange(hidden.shape[1])[None].expand(3, 1, -1)
                cos_sin = inner.rotary_emb(hidden, positions)
                out = head(hidden, model.get_input_embeddings()(tokens[:, 1:]), cos_sin, None, head.new_cache())
            assert relative_error(mtp_out[row, 0], out[0, -1]) < 1e-5, row


# --- sampling -------------------------------------------------------------------------------------------------------


def _chi_square(samples: torch.Tensor, probabilities: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probabilities.numel()).double()
    expected = samples.numel() * probabilities.double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing drawn where the target has no mass
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_the_acceptance_rule_draws_from_the_target_distribution():
    """The speculative-sampling step alone, on fixed distributions over 6 tokens with K = 2 and 200,000 rows: the
    first token kept is distributed as p_0, and when d_1 was accepted the second as p_1 (chi-square, 5 degrees of
    freedom: the 0.999 quantile is 20.5)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 6, generator=generator) * 1.5  # p_0, p_1, p_2
    target[0, 5] = -float("inf")  # a token the target never draws
    draft = torch.randn(2, 6, generator=generator)
    rows = 200_000
    run = speculative._Run.__new__(speculative._Run)
    run.K, run.device, run.greedy = 2, torch.device("cpu"), False
    torch.manual_seed(1)
    drafts = torch.stack([torch.multinomial(draft[j].softmax(-1), rows, replacement=True) for j in range(2)], 1)
    accepted, bonus = run._accept(drafts, draft.expand(rows, -1, -1), target.expand(rows, -1, -1))
    first = torch.where(accepted > 0, drafts[:, 0], bonus)
    assert _chi_square(first, target[0].softmax(-1)) < 20.5
    kept_first = accepted > 0
    second = torch.where(accepted[kept_first] > 1, drafts[kept_first, 1], bonus[kept_first])
    assert _chi_square(second, target[1].softmax(-1)) < 20.5
    assert 0.1 < kept_first.float().mean() < 0.9  # both branches ran


def test_speculative_sampling_through_the_model_keeps_its_distribution(model, monkeypatch):
    """Three tokens sampled with top_k=4 (64 possible continuations) from 6,000 rows at once with K = 2: the counts
    fit the model's exact probabilities (chi-square, 63 degrees of freedom: the 0.999 quantile is about 103.4). The
    head is set to pass the main model's hidden state through, so its drafts overlap the target and some pass."""
    monkeypatch.setattr(speculative.DraftSchedule, "MIN_ACCEPTED", 0.0)  # draft every round, however few pass
    head = mtp_head(model)
    saved = {name: value.clone() for name, value in head.state_dict().items()}
    h = model.config.hidden_size
    try:
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, h:] = torch.eye(h)
            head.layers[0].self_attn.o_proj.weight.zero_()
            head.layers[0].mlp.down_proj.weight.zero_()
        rows, settings = 6000, dict(do_sample=True, top_k=4, temperature=1.5, max_new_tokens=3)
        prompt = torch.randint(0, VOCAB - 4, (1, 6), generator=torch.Generator().manual_seed(7))
        torch.manual_seed(0)
        out = generate_tokens(model, prompt.expand(rows, -1), None, mtp_draft_tokens=2, **settings)[:, -3:]
        stats = model.mtp_stats
    finally:
        head.load_state_dict(saved)
    assert 0 < stats.accepted < stats.drafted

    def top4(context):
        with torch.no_grad():
            logits = model(input_ids=context).logits[:, -1] / 1.5
        values, tokens = logits.topk(4, dim=-1)
        return tokens[0].tolist(), values.softmax(-1)[0].tolist()

    index, probabilities = {}, []
    first, p_first = top4(prompt)
    for a, pa in zip(first, p_first):
        second, p_second = top4(torch.cat([prompt, torch.tensor([[a]])], 1))
        for b, pb in zip(second, p_second):
            third, p_third = top4(torch.cat([prompt, torch.tensor([[a, b]])], 1))
            for c, pc in zip(third, p_third):
                index[(a, b, c)] = len(probabilities)
                probabilities.append(pa * pb * pc)
    samples = torch.tensor([index[tuple(row)] for row in out.tolist()])  # KeyError: a path outside the top 4
    assert _chi_square(samples, torch.tensor(probabilities)) < 103.4


# --- the vision-language model --------------------------------------------------------------------------------------


def test_vision_language_model_is_lossless_with_an_image_prompt(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = model.config
    image = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
    rows = [[5, 6] + image + [7, 8], [0] * 6 + [9, 10, 11, 12]]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * 10, [0] * 6 + [1] * 4])
    pixels = torch.randn(16, 1536, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 4, 4]])
    settings = dict(pixel_values=pixels, image_grid_thw=grid, max_new_tokens=12)
    reference = generate_tokens(model, ids, mask, **settings)
    for draft_tokens in (1, 3):
        assert torch.equal(generate_tokens(model, ids, mask, mtp_draft_tokens=draft_tokens, **settings), reference)


@pytest.mark.parametrize("seed", range(6))
def test_committing_at_once_equals_committing_token_by_token(seed):
    """Rows stopped before, end-of-sequence tokens at any place (taken or past ``kept``), the length limit inside the
    block: the all-at-once commit leaves the same tokens, counts, stops and limit as the token-by-token loop asking
    transformers' own EosTokenCriteria after every token."""
    from transformers.generation import EosTokenCriteria, StoppingCriteriaList

    from transformers_qwen35.generation.speculative import _Run

    generator = torch.Generator().manual_seed(seed)
    batch, length, eos = 5, 4, torch.tensor([3, 7])

    def run():
        state = object.__new__(_Run)
        state.device, state.pad_id, state.streamer = torch.device("cpu"), 0, None
        state.pad_finished, state._fast_criteria, state.eos, state.limit = True, True, eos, 6
        state.criteria = StoppingCriteriaList([EosTokenCriteria(eos)])
        state.prompt = torch.ones(batch, 2, dtype=torch.long)
        state.generated = torch.zeros(batch, state.limit + length, dtype=torch.long)
        state.count = torch.tensor([0, 2, 4, 5, 6])
        state.stopped = torch.tensor([False, True, False, False, False])
        state.stop_count = torch.tensor([0, 2, 0, 0, 0])
        return state

    tokens = torch.randint(1, 9, (batch, length), generator=generator)
    kept = torch.randint(1, length + 1, (batch,), generator=generator)
    at_once, each = run(), run()
    for _ in range(2):  # a second block after the first, from the states it left
        taken_at_once, taken_each = at_once._commit_at_once(tokens, kept), each._commit_each(tokens, kept)
        assert torch.equal(taken_at_once, taken_each)
        for name in ("generated", "count", "stopped", "stop_count", "unfinished"):
            assert torch.equal(getattr(at_once, name), getattr(each, name)), name
        assert at_once.limit == each.limit
        tokens = torch.randint(1, 9, (batch, length), generator=generator)
    # Every row ends: the limit comes down to the longest row, as plain decoding's last stop sets it.
    at_once, each = run(), run()
    for state in (at_once, each):
        state.count = torch.tensor([0, 2, 4, 1, 3])
    tokens, kept = torch.full((batch, length), 7), torch.full((batch,), length)
    assert torch.equal(at_once._commit_at_once(tokens, kept), each._commit_each(tokens, kept))
    assert at_once.limit == each.limit == 5 and bool(at_once.stopped.all())
