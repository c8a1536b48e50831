"""Self-speculative decoding with the checkpoint's own MTP head: ``model.generate(..., mtp_draft_tokens=K)``.

One round, per batch row, with ``x`` the last token chosen but not yet run through the main model:

1. the MTP head drafts ``d_1..d_K`` (its first draft comes from the previous round's verification, for free);
2. one forward of the main model over ``[x, d_1, ..., d_K]`` gives its own distribution after each of them;
3. drafts are accepted left to right while they agree with the main model (greedy: same argmax; sampling: the
   standard speculative-sampling test, accept ``d_j`` with probability ``min(1, p(d_j) / q(d_j))`` and on rejection
   draw from ``max(0, p - q)``, which leaves the output distribution exactly the main model's);
4. the accepted drafts and one token of the main model's own are kept: 1 to K + 1 tokens per main-model pass.

Rows accept different counts, so each row keeps its own position counter. Gated DeltaNet states are stopped after
each row's kept tokens by ``Qwen3_5HybridCache.keep_speculated`` (a short recurrence over the recorded inputs; the
model is never run again); attention keys a row did not keep stay behind as masked holes. Logits processors and
stopping criteria see, for every scored position, exactly the ``input_ids`` plain decoding would have shown them.

Greedy output equals ``mtp_draft_tokens=0`` (plain ``generate()``) token for token, up to floating-point ties: the
main model scores drafted tokens in one multi-token forward instead of one token at a time.

The same loop with K = 0 is plain decoding; with ``cache_implementation="static"`` it runs on the fixed-shape state
of ``static_decode.py`` (CUDA graphs on a GPU), with or without drafts.

This is a ``custom_generate`` for transformers' ``generate()``: transformers prepares the generation config, inputs,
logits processors and stopping criteria; this module runs the decoding loop.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.generation import (
    EosTokenCriteria,
    GenerateDecoderOnlyOutput,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging

from ..core.cache import Qwen3_5HybridCache
from ..core.masks import CACHE_FIELD, build_attention_mask
from ..kernels.graph_key import moved_by_hooks
from .compiled_step import compile_arguments, compiled_forward_block
from .sampling import PresencePenaltyLogitsProcessor
from .static_decode import (
    CUDA_GRAPHS_ENV,
    GraphedBlock,
    StaticHybridCache,
    cuda_graphs_enabled,
    forward_block,
    return_static_cache,
    static_cache_for,
)

logger = logging.get_logger(__name__)

# Processors that ignore input_ids: these may score every drafted position in one call.
POSITION_FREE_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
# Processors without side effects: calling one once more, on a step whose result is thrown away, changes nothing.
PURE_PROCESSORS = POSITION_FREE_PROCESSORS + (
    RepetitionPenaltyLogitsProcessor, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor, PresencePenaltyLogitsProcessor,
)  # fmt: skip
UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclasses.dataclass
class MTPStats:
    """What the last ``generate(..., mtp_draft_tokens=K)`` did, summed over rows (``model.mtp_stats``)."""

    draft_tokens: int
    rounds: int = 0  # main-model passes after the prefill, with or without drafts (see DraftSchedule)
    drafted: int = 0  # drafts scored by the main model (rows still generating x K per drafting round)
    accepted: int = 0  # of which accepted
    emitted: int = 0  # tokens kept in drafting rounds: accepted drafts plus the main model's own

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens kept per row per drafting main-model pass (1.0 = no gain, at most K + 1)."""
        row_rounds = self.drafted / self.draft_tokens if self.draft_tokens else 0
        return self.emitted / row_rounds if row_rounds else 0.0


class DraftSchedule:
    """When to draft. A drafting round costs the head's passes and a longer verification; it pays only when drafts
    are accepted. After a round that accepts fewer than ``MIN_ACCEPTED`` drafts per row on average, drafting pauses
    for 1 round, then 2, 4 ... up to ``MAX_PAUSE`` after each further poor round, and resumes at once after a good
    one. So a head that rarely agrees (random weights, unusual text) costs little, and one that agrees is used at
    every round. Only speed depends on this: the output is the main model's either way."""

    MIN_ACCEPTED = 0.5
    MAX_PAUSE = 32

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.pause = 0  # rounds to go without drafts
        self.next_pause = 1

    def drafting(self) -> bool:
        if not self.enabled:
            return False
        if self.pause:
            self.pause -= 1
            return False
        return True

    def update(self, mean_accepted: float) -> None:
        if mean_accepted >= self.MIN_ACCEPTED:
            self.next_pause = 1
            return
        self.pause = self.next_pause
        self.next_pause = min(2 * self.next_pause, self.MAX_PAUSE)


def check_request(model, draft_tokens, kwargs: dict) -> None:
    """Refuse, before any compute, what the speculative loop cannot do."""
    if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 0:
        raise ValueError(f"mtp_draft_tokens must be a non-negative integer (0 = plain decoding), got {draft_tokens!r}.")
    what = "mtp_draft_tokens" if draft_tokens else "cache_implementation='static'"
    config = kwargs.get("generation_config") or model.generation_config

    def setting(key, default=None):
        return kwargs[key] if key in kwargs else getattr(config, key, default)

    if (setting("num_beams") or 1) > 1:
        raise ValueError(f"{what} cannot be combined with beam search (num_beams > 1): use one or the other.")
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens"):
        raise ValueError(f"{what} cannot be combined with assistant_model / prompt lookup decoding.")
    for key in UNSUPPORTED_OUTPUTS:
        if setting(key, False):
            raise ValueError(
                f"{key}=True is not available with {what} (per-step outputs are not kept); generate without it for "
                "per-step outputs."
            )
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"{what} needs input_ids, not inputs_embeds.")
    cache = kwargs.get(CACHE_FIELD, kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"{what} starts from a fresh prompt: continuing a cache is not supported. Pass the whole conversation as "
            "input_ids instead."
        )
    if draft_tokens:
        model.get_mtp_head()  # a missing head is reported now, not after the prefill


def mtp_generate(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus=False,
    streamer=None,
    *,
    draft_tokens: int,
    static: bool = False,
    **model_kwargs,
):
    """The decoding loop (called by ``generate()`` with its prepared arguments; see the module docstring).
    ``static``: decode with fixed-shape state (``static_decode.py``), replayed as CUDA graphs on a GPU."""
    if synced_gpus:
        raise ValueError("mtp_draft_tokens / static decoding do not support synced_gpus (ZeRO-3 / FSDP generation).")
    if streamer is not None:
        streamer.put(input_ids.cpu())  # the prompt first, as plain generate() does
    run = _Run(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, draft_tokens, static)
    try:
        run.prefill(model_kwargs)
        if run.plain:
            run.decode_plain()
        while run.unfinished.any():
            run.round()
    finally:
        if isinstance(run.cache, StaticHybridCache):
            return_static_cache(run.cache)
    if streamer is not None:
        streamer.end()
    model.mtp_stats = run.stats
    sequences = run.sequences()
    if generation_config.return_dict_in_generate:
        # No cache: its attention layers hold the rejected drafts' holes, so it cannot be continued.
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


class _Run:
    """State of one speculative ``generate()`` call."""

    def __init__(self, model, input_ids, processors, criteria, generation_config, streamer, draft_tokens, static):
        self.model, self.K, self.streamer = model, draft_tokens, streamer
        self.head = model.get_mtp_head() if draft_tokens else None
        self.static = static
        self.text_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
        # CUDA graphs for the static loop's blocks, unless turned off or accelerate's hooks move tensors in Python.
        # A graph replays fixed frequencies: RoPE that rescales with the length (dynamic, longrope) decodes eagerly.
        fixed_rope = self.text_model.rotary_emb.rescale_past is None
        self.use_graphs = static and input_ids.is_cuda and cuda_graphs_enabled() and not moved_by_hooks(model)
        self.use_graphs = self.use_graphs and fixed_rope
        # On the CPU, the static block compiled with torch.compile when the generation config asks (compile_config).
        arguments = compile_arguments(generation_config, input_ids.device) if static else None
        self.compiled_block = compiled_forward_block(model, arguments) if arguments is not None else None
        self.processors, self.criteria = processors, criteria
        self.greedy = not generation_config.do_sample
        self.prompt = input_ids
        batch, self.prompt_length = input_ids.shape
        self.device = input_ids.device
        pad = generation_config._pad_token_tensor
        self.pad_id = int(pad) if pad is not None else 0
        budget = generation_config.max_length - self.prompt_length
        self.max_new = max(budget, 0)
        # generated[b, :count[b]] are row b's new tokens; the rest is padding. Room for one round's overshoot.
        self.generated = torch.full(
            (batch, self.max_new + self.K + 1), self.pad_id, dtype=torch.long, device=self.device
        )
        self.count = torch.zeros(batch, dtype=torch.long, device=self.device)
        # As transformers does: a row some criterion stopped is padded from then on if an end-of-sequence criterion
        # is present, else it goes on generating until the last row stops, and every row ends at that length.
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.stop_count = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pad_finished = any(hasattr(c, "eos_token_id") for c in criteria)
        self.limit = self.max_new
        self.unfinished = self._generating()
        self.stats = MTPStats(draft_tokens=self.K)
        self.schedule = DraftSchedule(enabled=draft_tokens > 0)
        self._fast_criteria = all(isinstance(c, (EosTokenCriteria, MaxLengthCriteria)) for c in criteria)
        eos = [c.eos_token_id for c in criteria if isinstance(c, EosTokenCriteria)]
        self.eos = torch.cat([e.reshape(-1) for e in eos]).to(self.device) if eos else None
        # Plain static decoding with end-of-sequence / length stops: the lean loop of decode_plain.
        self.plain = static and not draft_tokens and self._fast_criteria

    # --- model passes ---------------------------------------------------------------------------------------------

    def prefill(self, model_kwargs: dict) -> None:
        model, batch = self.model, self.prompt.shape[0]
        mask = model_kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(self.prompt, dtype=torch.bool)
        self.cache = Qwen3_5HybridCache(self.text_model.config)
        self.key_valid = valid.clone()  # main model's attention keys: (B, cached positions)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        extra = {key: value for key, value in model_kwargs.items() if key in _VISION_KWARGS and value is not None}
        if extra:
            # The multimodal model works out image positions itself; take its rope rows for the MTP head.
            inner = model.model
            types = inner._token_types(self.prompt, extra.get("mm_token_type_ids"), batch, self.prompt_length)
            grids = extra.get("image_grid_thw"), extra.get("video_grid_thw")
            full = inner._positions(None, types, mask, self.cache, 0, *grids, self.device)
            rope = full[1:]
            outputs = inner(input_ids=self.prompt, attention_mask=mask, position_ids=full, cache=self.cache,
                            use_cache=True, **extra)  # fmt: skip
        else:
            rope = positions.unsqueeze(0).expand(3, -1, -1)
            outputs = model.model(
                input_ids=self.prompt, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True
            )
        hidden = outputs.last_hidden_state
        self.position = valid.sum(-1)  # position of the next token each row will run through the main model
        logits = model.lm_head(hidden[:, -1:]).float()[:, 0]
        scores = self._score(logits[:, None], drafts=None)[:, 0]
        first = self._choose(scores)
        self._commit(first[:, None], torch.ones_like(self.count))
        self.last = first
        if self.static:
            needed = self.prompt_length + self.max_new + self.K + 1
            self.cache = static_cache_for(model, self.cache, valid, needed, self.text_model.config)
        if not self.K:
            return

        # The MTP head reads pairs (H[t], token[t + 1]): the prompt shifted by one, then the token just chosen.
        self.mtp_cache = self.head.new_cache()
        self.mtp_valid = valid.clone()
        following = torch.cat([self.prompt[:, 1:], first[:, None]], dim=1)
        out = self._mtp(hidden, following, rope, self.mtp_valid)
        self.mtp_out = out[:, -1:]

    def _mtp(self, hidden, tokens, rope, key_valid):
        """Run the MTP head over new slots; ``key_valid`` covers every slot of its cache including these."""
        past = self.mtp_cache.get_seq_length()
        length = tokens.shape[1]
        embeddings = self.model.get_input_embeddings()(tokens)
        cos_sin = self.text_model.rotary_emb(hidden, rope)
        implementation = self.text_model.config._attn_implementation or "eager"
        mask = build_attention_mask(
            None if bool(key_valid.all()) else key_valid, None, hidden.shape[0], length, past, hidden.device,
            needs_causal_mask=implementation == "eager",
        )  # fmt: skip
        return self.head(hidden, embeddings, cos_sin, mask, self.mtp_cache)

    def _rope(self, positions):
        """Rotary rows ``(3, B, T)`` for text positions ``(B, T)`` after the prompt (the row's image offset added)."""
        deltas = self.cache.rope_deltas
        rope = positions if deltas is None else positions + deltas.to(positions.device)
        return rope.unsqueeze(0).expand(3, -1, -1)

    def round(self) -> None:
        k = self.K if self.schedule.drafting() else 0  # drafts this round
        steps = torch.arange(k + 1, device=self.device)
        drafts, draft_scores = self.draft(k)

        # Verification: one main-model pass over [last, d_1..d_k] (no drafts: [last], plain decoding).
        block = torch.cat([self.last[:, None], drafts], 1)
        positions = self.position[:, None] + steps
        self.cache.speculating = k > 0
        try:
            hidden = self._forward_block(block, positions)
        finally:
            self.cache.speculating = False
        logits = self.model.lm_head(hidden).float()  # (B, k + 1, V)
        target_scores = self._score(logits, drafts=drafts)

        accepted, bonus = self._accept(drafts, draft_scores, target_scores)
        kept = accepted + 1  # tokens of the block the main model's state keeps: last, d_1..d_accepted
        new_tokens = torch.cat([drafts, bonus[:, None]], 1).scatter(1, accepted[:, None], bonus[:, None])
        self.stats.rounds += 1
        longest = 1
        if k:
            # The round's counts in one transfer from the device (each separate read would wait for it again).
            live = self.unfinished
            counts = torch.stack([live.sum(), (accepted * live).sum(), (kept * live).sum(), kept.max()])
            rows, accepted_total, emitted, longest = counts.tolist()
            self.stats.drafted += rows * k
            self.stats.accepted += accepted_total
            self.stats.emitted += emitted
            self.schedule.update(accepted_total / rows if rows else 0.0)
        self._commit(new_tokens, kept)

        # States after each row's kept tokens; dropped positions become holes in the attention caches.
        self.position = self.position + kept
        self.last = bonus
        if k:
            self.cache.keep_speculated(kept, longest)
        elif self.static:
            self.cache.advance(1)
        if not self.static:
            self.key_valid = torch.cat([self.key_valid, steps[None, :longest] < kept[:, None]], 1)
        if not self.K:
            return
        # The MTP head takes (H[t], token[t + 1]) for the kept positions: the next draft comes from the last one.
        # Rounds without drafts feed it too, so that its cache stays complete for the next drafting round.
        self.mtp_valid = torch.cat([self.mtp_valid, steps[None, :] < kept[:, None]], 1)
        out = self._mtp(hidden, new_tokens, self._rope(positions), self.mtp_valid)
        self.mtp_out = out.gather(1, accepted[:, None, None].expand(-1, 1, out.shape[-1]))
        self.mtp_cache.trim_attention(self.mtp_cache.get_seq_length() - (k + 1 - longest))
        self.mtp_valid = self.mtp_valid[:, : self.mtp_valid.shape[1] - (k + 1 - longest)]

    def _forward_block(self, block, positions):
        """The main model's final hidden states for ``block`` ``(B, T)`` at text positions ``(B, T)``."""
        if self.static:
            rope = self._rope(positions)
            if self.use_graphs and self.cache.shared:  # a private cache (concurrent call) decodes without graphs
                length, graphs = block.shape[1], self.cache.graphs
                if length not in graphs:
                    graphs[length] = _capture(self.model, self.cache, length)
                if graphs[length] is not None:
                    # The graph's own output tensor: read (lm_head, MTP head) before the next replay overwrites it.
                    return graphs[length](block, rope)
            return (self.compiled_block or forward_block)(self.model, self.cache, block, rope)
        batch, length = block.shape
        key_valid = torch.cat([self.key_valid, torch.ones(batch, length, dtype=torch.bool, device=self.device)], 1)
        return self.model.model(
            input_ids=block,
            attention_mask=None if bool(key_valid.all()) else key_valid,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state

    def decode_plain(self) -> None:
        """Plain decoding on the static cache, one token per row per step, with no host synchronisation inside a
        step: every row still generating has made the same number of steps (``self.count`` equals the host-side
        ``steps`` for them), so the loop needs neither per-row counts nor per-step checks on the host. Whether any row
        is still generating is read one step late (through pinned memory), so the CPU prepares step ``n + 1`` while
        the GPU runs step ``n``; the one step it may run past the end commits nothing (no row is generating), and
        is taken only when the logits processors have no side effects to repeat and no streamer waits for each token
        (which synchronises every step anyway)."""
        steps = 1  # tokens of the generating rows so far (the prefill chose the first)
        asynchronous = (
            self.device.type == "cuda"
            and self.streamer is None
            and all(isinstance(p, PURE_PROCESSORS) for p in self.processors)
        )
        if asynchronous:  # two host flags, written alternately by the device and read one step later
            flags = torch.ones(2, dtype=torch.bool, pin_memory=True)
            written = [torch.cuda.Event(), torch.cuda.Event()]
        while steps < self.limit:  # at the limit no row generates: stop without asking the device
            self._plain_step(steps)
            steps += 1
            if not asynchronous:
                if not bool(self.unfinished.any()):
                    break
                continue
            now, before = steps % 2, (steps + 1) % 2
            flags[now].copy_(self.unfinished.any(), non_blocking=True)
            written[now].record()
            if steps > 2:  # the previous step's flag (the first step's check is this one's, one late)
                written[before].synchronize()
                if not bool(flags[before]):
                    break

    def _plain_step(self, steps: int) -> None:
        hidden = self._forward_block(self.last[:, None], self.position[:, None])
        logits = self.model.lm_head(hidden).float()  # (B, 1, V)
        if self.processors:
            # Rows still generating have ``steps`` tokens; a stopped row's later slots hold padding, exactly the
            # input_ids transformers shows processors for finished rows.
            ids = torch.cat([self.prompt, self.generated[:, :steps]], 1)
            scores = self.processors(ids, logits[:, 0])
        else:
            scores = logits[:, 0]
        token = self._choose(scores)
        self.stats.rounds += 1
        take = self.unfinished
        slot = self.count[:, None]
        self.generated.scatter_(1, slot, torch.where(take[:, None], token[:, None], self.generated.gather(1, slot)))
        self.count += take
        if self.eos is not None:  # the only criterion besides the length (the lean loop's condition)
            fired = take & ~self.stopped & torch.isin(token, self.eos)
            self.stop_count = torch.where(fired, self.count, self.stop_count)
            self.stopped |= fired
        self.unfinished = self._generating()
        self.position = self.position + 1
        self.last = token
        self.cache.advance(1)
        if self.streamer is not None:  # as transformers streams: padding for the rows that no longer generate
            self.streamer.put(torch.where(take, token, torch.full_like(token, self.pad_id)).cpu())

    def draft(self, k: int):
        """``k`` drafts ``(B, k)`` and the scores they were chosen from ``(B, k, V)``. The first comes from the MTP
        output of the last round; each further one feeds the head its own output and the previous draft, one
        position on. Those extra slots of the head's cache are forgotten afterwards."""
        batch = self.prompt.shape[0]
        if not k:
            return self.last.new_zeros(batch, 0), None
        mtp_length = self.mtp_cache.get_seq_length()
        drafts, draft_scores = [], []
        out = self.mtp_out
        for j in range(k):
            logits = self.model.lm_head(out).float()[:, 0]
            scores = self._score(logits[:, None], drafts=torch.stack(drafts, 1) if drafts else None, offset=j)[:, 0]
            token = self._choose(scores)
            drafts.append(token)
            draft_scores.append(scores)
            if j + 1 < k:
                position = (self.position + j)[:, None]
                valid = torch.cat([self.mtp_valid, torch.ones(batch, j + 1, dtype=torch.bool, device=self.device)], 1)
                out = self._mtp(out, token[:, None], self._rope(position), valid)
        self.mtp_cache.trim_attention(mtp_length)
        return torch.stack(drafts, 1), torch.stack(draft_scores, 1)

    # --- scoring, choosing, accepting -----------------------------------------------------------------------------

    def _score(self, logits, drafts, offset: int | None = None):
        """Logits processors on ``logits`` ``(B, T, V)``; position ``t`` follows the committed tokens and
        ``drafts[:, :t]`` (or ``drafts[:, :offset]`` for a single position). Returns fp32 scores ``(B, T, V)``."""
        if not self.processors:
            return logits
        batch, length, vocab = logits.shape
        if all(isinstance(p, POSITION_FREE_PROCESSORS) for p in self.processors):
            ids = self.prompt.repeat_interleave(length, 0)
            return self.processors(ids, logits.reshape(-1, vocab)).reshape(batch, length, vocab)
        scores = torch.empty_like(logits)
        for t in range(length):
            for rows, ids in self._contexts(drafts, offset if offset is not None else t):
                scores[rows, t] = self.processors(ids, logits[:, t])[rows]
        return scores

    def _contexts(self, drafts, extra: int):
        """The ``input_ids`` plain decoding would show after ``extra`` drafts, as ``[(rows, ids (B, L))]``: rows
        that have generated the same count share one whole-batch tensor (whole-batch because processors may keep
        per-row state, e.g. the prompt padding of the repetition penalty); other rows' entries are filler."""
        groups = []
        for count in self.count.unique().tolist():
            rows = (self.count == count).nonzero().squeeze(1)
            pieces = [self.prompt, self.generated[:, :count]]
            if extra:
                pieces.append(drafts[:, :extra])
            groups.append((rows, torch.cat(pieces, 1)))
        return groups

    def _choose(self, scores):
        if self.greedy:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1)

    def _accept(self, drafts, draft_scores, target_scores):
        """Number of drafts accepted per row ``(B,)`` and the main model's own next token ``(B,)``."""
        K = drafts.shape[1]
        rows = torch.arange(drafts.shape[0], device=self.device)
        if not K:  # plain decoding: the main model's own token
            return torch.zeros_like(rows), self._choose(target_scores[:, 0])
        if self.greedy:
            choice = target_scores.argmax(-1)  # (B, K + 1)
            agree = (choice[:, :K] == drafts).long()
            accepted = agree.cumprod(1).sum(1)
            return accepted, choice[rows, accepted]
        p = target_scores.softmax(-1)  # (B, K + 1, V)
        q = draft_scores.softmax(-1)  # (B, K, V)
        p_draft = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
        q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
        # Accept with probability min(1, p/q); q > 0 for a token sampled from q.
        agree = (torch.rand_like(p_draft) * q_draft <= p_draft).long()
        accepted = agree.cumprod(1).sum(1)
        p_next = p[rows, accepted]
        q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, accepted]  # no draft after the last: q = 0
        residual = (p_next - q_next).clamp(min=0)
        # p == q leaves nothing: such a draft is never rejected, but guard against rounding.
        empty = residual.sum(-1, keepdim=True) <= 0
        residual = torch.where(empty, p_next, residual)
        return accepted, torch.multinomial(residual / residual.sum(-1, keepdim=True), 1).squeeze(1)

    # --- committing -----------------------------------------------------------------------------------------------

    def _generating(self):
        rows = self.count < self.limit
        return rows & ~self.stopped if self.pad_finished else rows

    def _commit(self, tokens, kept):
        """Append each generating row's first ``kept[b]`` of ``tokens`` (B, T), checking the stopping criteria after
        every token as plain decoding does. Returns how many tokens each row took."""
        if self._fast_criteria:
            return self._commit_at_once(tokens, kept)
        return self._commit_each(tokens, kept)

    def _commit_each(self, tokens, kept):
        """``_commit`` token by token, for any stopping criteria."""
        batch, length = tokens.shape
        taken = torch.zeros(batch, dtype=torch.long, device=self.device)
        stream = []
        for t in range(length):
            take = self._generating() & (t < kept)
            if not bool(take.any()):
                break
            rows = take.nonzero().squeeze(1)
            self.generated[rows, self.count[rows]] = tokens[rows, t]
            self.count[rows] += 1
            taken[rows] += 1
            stream.append(torch.where(take, tokens[:, t], torch.full_like(tokens[:, t], self.pad_id)))
            fresh = rows[~self.stopped[rows]]
            if fresh.numel():
                fired = fresh[self._stopped(fresh)]
                self.stopped[fired] = True
                self.stop_count[fired] = self.count[fired]
                if bool(self.stopped.all()):
                    self.limit = min(self.limit, int(self.stop_count.max()))
        self.unfinished = self._generating()
        if self.streamer is not None:
            for step in stream:
                self.streamer.put(step.cpu())
        return taken

    def _commit_at_once(self, tokens, kept):
        """``_commit`` for end-of-sequence and length stops only, for all tokens at once: row ``b`` takes its first
        ``n[b]`` tokens, ``n`` being ``kept`` cut at the length limit and just after the row's first end-of-sequence
        token (rows already stopped take none when finished rows are padded). One read from the device (whether all
        rows have stopped), where the token-by-token loop waits for it several times per token."""
        length = tokens.shape[1]
        steps = torch.arange(length, device=self.device)
        taken = torch.minimum(kept, (self.limit - self.count).clamp(min=0))
        if self.pad_finished:
            taken = torch.where(self.stopped, 0, taken)
        if self.eos is not None:
            ends = torch.isin(tokens, self.eos) & (steps[None, :] < taken[:, None])
            first = torch.where(ends.any(1), ends.long().argmax(1), length)  # the first end-of-sequence taken
            fired = (first < length) & ~self.stopped
            taken = torch.where(ends.any(1) & self.pad_finished, torch.minimum(taken, first + 1), taken)
            self.stop_count.copy_(torch.where(fired, self.count + first + 1, self.stop_count))
            self.stopped |= fired
        slots = self.count[:, None] + steps[None, :]  # inside generated: it has room for a round's overshoot
        writes = steps[None, :] < taken[:, None]
        self.generated.scatter_(1, slots, torch.where(writes, tokens, self.generated.gather(1, slots)))
        self.count += taken
        if self.pad_finished and self.eos is not None:
            all_stopped, longest_stop = torch.stack([self.stopped.all().long(), self.stop_count.max()]).tolist()
            if all_stopped:
                self.limit = min(self.limit, longest_stop)
        self.unfinished = self._generating()
        if self.streamer is not None:  # as the loop streams: one step per token, padding for rows that took none
            for t in range(int(taken.max())):
                self.streamer.put(torch.where(t < taken, tokens[:, t], self.pad_id).cpu())
        return taken

    def _stopped(self, rows):
        """Whether the stopping criteria fire for ``rows`` right after their latest token (the token-by-token
        commit's check: end-of-sequence and length stops alone are committed at once, ``_commit_at_once``)."""
        fired = torch.zeros(self.count.shape[0], dtype=torch.bool, device=self.device)
        for group, ids in self._contexts(None, 0):
            fired[group] = self.criteria(ids, None).to(self.device)[group]
        return fired[rows]

    def sequences(self):
        longest = min(int(self.count.max()), self.limit) if self.count.numel() else 0
        return torch.cat([self.prompt, self.generated[:, :longest]], 1)


def _capture(model, cache, length: int) -> GraphedBlock | None:
    """The block captured as a CUDA graph, or None (with one warning) if capturing fails: the block then runs
    eagerly on the same fixed-shape state, slower but with the same result."""
    try:
        return GraphedBlock(model, cache, length)
    except RuntimeError as error:
        logger.warning(
            f"Capturing the decoding step as a CUDA graph failed ({type(error).__name__}: {str(error)[:200]}); "
            f"decoding without graphs. Set {CUDA_GRAPHS_ENV}=0 to skip the attempt."
        )
        return None


_VISION_KWARGS = (
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "mm_token_type_ids",
)
