"""One model, several threads calling ``generate()`` at once (a threaded server): every call must get the tokens it
gets alone, on each decoding path (transformers' loop on our cache, our static loop, MTP speculative decoding).

Each thread has its own prompts (different batch sizes and lengths, so a shared state could not even fit), all
threads are released together by a barrier, and the round is repeated; the oracle is the same call made alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import generate_tokens, left_padded_prompts, write_untied_tiny_checkpoint
from transformers import AutoModelForCausalLM

from transformers_qwen35.generation import static_decode

THREADS, ROUNDS = 4, 3
PATHS = {
    "plain": dict(cache_implementation="dynamic"),
    "static": dict(cache_implementation="static"),
    "mtp": dict(mtp_draft_tokens=2),
    "mtp-static": dict(mtp_draft_tokens=2, cache_implementation="static"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    checkpoint = write_untied_tiny_checkpoint(tmp_path_factory.mktemp("threads"), seed=5)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _requests():
    return [left_padded_prompts(batch=1 + i % 3, length=7 + 2 * i, seed=10 + i) for i in range(THREADS)]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_threads_sharing_a_model_each_get_their_own_tokens(model, path):
    kwargs = PATHS[path]
    requests = _requests()
    alone = [generate_tokens(model, ids, mask, max_new_tokens=10, **kwargs) for ids, mask in requests]
    barrier = threading.Barrier(THREADS)
    results, errors = {}, []

    def serve(index: int) -> None:
        ids, mask = requests[index]
        try:
            for round_ in range(ROUNDS):
                barrier.wait(timeout=60)
                results[index, round_] = generate_tokens(model, ids, mask, max_new_tokens=10, **kwargs)
        except Exception as error:  # reported below, with the thread it came from
            errors.append((index, error))
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a generate() call hung"
    assert not errors, errors
    for (index, round_), tokens in results.items():
        assert torch.equal(tokens, alone[index]), f"thread {index}, round {round_}: another request's state leaked in"


def test_the_kept_static_cache_is_reused_after_concurrent_calls_end(model):
    """Concurrent calls decode on private caches; the model's kept cache (and its graphs) is leased again after."""
    ids, mask = left_padded_prompts(batch=2, length=8, seed=1)
    generate_tokens(model, ids, mask, cache_implementation="static")
    kept = static_decode._CACHES[model]
    assert not kept.leased
    generate_tokens(model, ids, mask, cache_implementation="static")
    assert static_decode._CACHES[model] is kept and not kept.leased
