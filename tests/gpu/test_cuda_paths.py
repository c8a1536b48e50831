"""GPU checks (skipped without CUDA): the fla path against the PyTorch path and built-in transformers, on one GPU.

Run by ``benchmarks/device_check.sh`` on the lent GPU machine. Tiny models, so the whole file takes seconds once the
Triton kernels are compiled. Tolerances are those of bf16 arithmetic (fla computes in bf16 with fp32 states);
the exactness of the math itself is proven on CPU in fp32 by the rest of the suite.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ROPE, build_pair, relative_error

from transformers_qwen35.core.masks import CACHE_FIELD
from transformers_qwen35.kernels import dispatch as kernels

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core"),
]

DEVICE = "cuda"
# fla's kernels want head dims of at least 16 and a multiple of 16: widen the tiny CPU config (its multimodal RoPE
# sections then cover the wider rotary half-dimension, 32 x 0.5 / 2 = 8).
GPU_SHAPES = dict(
    hidden_size=128, intermediate_size=256, linear_key_head_dim=32, linear_value_head_dim=32, head_dim=32,
    vocab_size=512, rope_parameters={**ROPE, "mrope_section": [4, 2, 2]},
)  # fmt: skip


def _pair(dtype=torch.bfloat16, seed=0, attn_implementation="eager"):
    ours, native = build_pair(seed=seed, attn_implementation=attn_implementation, **GPU_SHAPES)
    return ours.to(DEVICE, dtype), native.to(DEVICE, dtype)


def _ids(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, GPU_SHAPES["vocab_size"], (batch, length), generator=generator).to(DEVICE)


def _with_kernels(monkeypatch, mode):
    monkeypatch.setenv(kernels.KERNELS_ENV, mode)


def _rms_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||."""
    reference = reference.detach().double()
    return float((ours.detach().double() - reference).norm() / reference.norm().clamp_min(1e-30))


def _within_rounding(fast, same_precision, exact, slack=2.0):
    """fla's bf16 result is no further from the fp32 answer than our PyTorch path in the same bf16 precision (the
    rounding noise of that precision, times ``slack``, plus a little): a wrong kernel or argument is O(1) off."""
    error, noise = _rms_error(fast, exact), _rms_error(same_precision, exact)
    return error <= slack * noise + 1e-3, f"fla {error:.2e} vs PyTorch path in the same precision {noise:.2e}"


def test_fla_forward_matches_pytorch_path_and_builtin(monkeypatch):
    ours, native = _pair()
    exact_model, _ = _pair(dtype=torch.float32)
    ids = _ids(2, 300)
    with torch.no_grad():
        _with_kernels(monkeypatch, "torch")
        exact = exact_model(ids).logits.float()
        same = ours(ids).logits.float()
        builtin = native(ids).logits.float()
        _with_kernels(monkeypatch, "fla")
        fast = ours(ids).logits.float()
    ok, detail = _within_rounding(fast, same, exact)
    assert ok, detail
    ok, detail = _within_rounding(builtin, same, exact, slack=3.0)  # built-in transformers, same weights
    assert ok, "built-in: " + detail


def test_fla_backward_matches_pytorch_path(monkeypatch):
    """Training on the fla path (through our replacement for the piece fla refuses on Hopper with Triton < 3.7.1),
    against the fp32 PyTorch path: under bf16 autocast, loss and gradients within the distance of the PyTorch path
    under the same autocast; in fp32 (fla's dots in TF32), every parameter's gradient close on its own."""
    from transformers_qwen35.kernels import hopper_backward

    ours, _ = _pair(dtype=torch.float32, seed=1)
    ours.train()
    ids = _ids(2, 200, seed=1)
    results = {}
    runs = (("exact", "torch", False), ("same", "torch", True), ("fast", "fla", True), ("fast fp32", "fla", False))
    for name, mode, autocast in runs:
        _with_kernels(monkeypatch, mode)
        ours.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = ours(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in ours.named_parameters()}
        results[name] = (loss.detach().float().reshape(1), grads)
    if hopper_backward.refused_by_fla(ids.float()):
        assert kernels._load_fla().hopper_backward, "our replacement for fla's refused backward is not registered"
    (exact_loss, exact), (same_loss, same), (fast_loss, fast) = results["exact"], results["same"], results["fast"]
    ok, detail = _within_rounding(fast_loss, same_loss, exact_loss, slack=3.0)
    assert ok, "loss: " + detail
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads.values()])  # noqa: E731
    ok, detail = _within_rounding(flat(fast), flat(same), flat(exact))
    assert ok, "all gradients: " + detail
    # Each parameter on its own, in fp32: an O(1) error cannot hide in a small one. Not in bf16: the per-head gate
    # parameters (A_log, dt_bias) sum a gradient over every token with heavy cancellation, and fla's bf16 dots put
    # ~0.4 relative error there (measured on the H100) that our fp32-computing PyTorch op has no counterpart for.
    fp32_loss, fp32 = results["fast fp32"]
    assert _rms_error(fp32_loss, exact_loss) < 1e-3
    assert _rms_error(flat(fp32), flat(exact)) < 2e-2
    for name in exact:
        assert _rms_error(fp32[name], exact[name]) < 0.1, name


@pytest.mark.parametrize("packed", [False, True])
def test_fla_backward_at_the_real_head_size_where_fla_refuses_its_own(monkeypatch, packed):
    """Hopper + Triton in [3.4, 3.7.1): fla's own gated chunk backward raises (fla #640); ours replaces the refused
    piece through fla's backend registry. The whole op (K = V = 128; grouped value heads when packed; bf16) against
    our PyTorch path in fp32: output, final state and every input gradient. Elsewhere fla's own kernel runs and must
    agree too."""
    from transformers_qwen35.kernels import hopper_backward
    from transformers_qwen35.kernels.reference.gated_delta_rule import chunk_gated_delta_rule as torch_chunk

    fla = kernels._load_fla()
    calls = []
    original = hopper_backward.chunk_bwd_dqkwg
    monkeypatch.setattr(hopper_backward, "chunk_bwd_dqkwg", lambda *a, **k: calls.append(1) or original(*a, **k))
    generator = torch.Generator(device=DEVICE).manual_seed(11)
    batch, length = (1, 1000) if packed else (2, 300)
    # Unpacked: 0.8B's heads (16 key, 16 value), whose autotuning results benchmarks/triton-autotune.tgz carries;
    # packed: grouped value heads, as 9B has (16 key, 32 value), at a quarter of the heads.
    heads, value_heads, dim = (4, 8, 128) if packed else (16, 16, 128)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator, device=DEVICE).to(dtype).requires_grad_()

    q, k = randn(batch, length, heads, dim), randn(batch, length, heads, dim)
    v = randn(batch, length, value_heads, dim)
    g = (-torch.rand(batch, length, value_heads, generator=generator, device=DEVICE) * 0.2).requires_grad_()
    beta = torch.rand(batch, length, value_heads, generator=generator, device=DEVICE).bfloat16().requires_grad_()
    cu_seqlens = torch.tensor([0, 300, 1000], device=DEVICE) if packed else None
    state = None if packed else randn(batch, value_heads, dim, dim, dtype=torch.float32)
    inputs = [x for x in (q, k, v, g, beta, state) if x is not None]
    do = torch.randn(batch, length, value_heads, dim, generator=generator, device=DEVICE)
    dfinal = torch.randn(1 if packed else batch, value_heads, dim, dim, generator=generator, device=DEVICE)
    if packed:
        dfinal = torch.cat([dfinal, dfinal.flip(1)])

    def gradients(run):
        out, final = run()
        torch.autograd.backward([out.float(), final.float()], [do, dfinal])
        grads = [x.grad.float().clone() for x in inputs]
        for x in inputs:
            x.grad = None
        return [out.float().detach(), final.float().detach(), *grads]

    fast = gradients(lambda: fla.chunk(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                                       cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True))  # fmt: skip
    upcast = [x.float() if x is not None else None for x in (q, k, v, g, beta, state)]
    exact = gradients(lambda: torch_chunk(*upcast, output_final_state=True, cu_seqlens=cu_seqlens))
    if hopper_backward.refused_by_fla(q):
        assert fla.hopper_backward and calls, "fla's refused piece did not run on our replacement"
    else:
        assert not calls
    names = ["output", "final state", "dq", "dk", "dv", "dg", "dbeta", "dstate"]
    for name, got, expected in zip(names, fast, exact):  # bf16 kernels against fp32: fla's own tests allow ~2e-2
        assert _rms_error(got, expected) < 3e-2, name


def test_packed_sequences_stay_apart_on_fla(monkeypatch):
    ours, _ = _pair(seed=2)
    _with_kernels(monkeypatch, "fla")
    a, b = _ids(1, 130, seed=2), _ids(1, 70, seed=3)
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(130), torch.arange(70)])[None].to(DEVICE)
    with torch.no_grad():
        together = ours(packed, position_ids=positions).logits.float()
        alone = torch.cat([ours(a).logits, ours(b).logits], 1).float()
    assert relative_error(together, alone) < 2e-2


def test_cached_decode_on_fla_matches_a_full_forward(monkeypatch):
    """fla's recurrent decode steps continue its chunked prefill: the cached steps land as close to the fp32 full
    forward as our PyTorch path's cached steps in the same bf16 (on CPU: 2.7e-2; a halved recurrent state 0.16, a
    zeroed one 0.33, zeroed conv states 0.80)."""
    ours, _ = _pair(seed=3)
    exact_model, _ = _pair(dtype=torch.float32, seed=3)
    ids = _ids(2, 100, seed=4)

    def cached_steps():
        cache = getattr(ours(ids[:, :90], use_cache=True), CACHE_FIELD)
        steps = [ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits.float() for t in range(90, 100)]
        return torch.cat(steps, 1)

    with torch.no_grad():
        _with_kernels(monkeypatch, "torch")
        exact = exact_model(ids).logits.float()[:, 90:]
        same = cached_steps()
        _with_kernels(monkeypatch, "fla")
        fast = cached_steps()
    ok, detail = _within_rounding(fast, same, exact, slack=3.0)  # fla's chunk and recurrent kernels round apart
    assert ok, detail


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """A tiny official-layout checkpoint (MTP head included) on the GPU in fp32, TF32 off so that ties cannot differ."""
    from transformers import AutoModelForCausalLM

    from transformers_qwen35.model.checkpoint import write_random_checkpoint
    from transformers_qwen35.model.presets import tiny_config

    torch.backends.cuda.matmul.allow_tf32 = False
    config = tiny_config(vocab_size=512)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    for key in ("linear_key_head_dim", "linear_value_head_dim"):
        setattr(config.text_config, key, 32)
    directory = write_random_checkpoint(tmp_path_factory.mktemp("gpu"), config, seed=5)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(DEVICE).eval()


def _batch():
    ids = _ids(3, 40, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def _generate(model, **kwargs):
    ids, mask = _batch()
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, **kwargs)


def test_mtp_greedy_is_lossless_on_the_gpu(official_tiny, monkeypatch):
    _with_kernels(monkeypatch, "auto")
    reference = _generate(official_tiny, cache_implementation="dynamic")  # transformers' own loop
    for draft_tokens in (1, 2, 3, 4):
        assert torch.equal(_generate(official_tiny, mtp_draft_tokens=draft_tokens), reference), draft_tokens


def test_static_decoding_with_cuda_graphs_equals_plain_decoding(official_tiny, monkeypatch):
    from transformers_qwen35.generation.static_decode import CUDA_GRAPHS_ENV

    _with_kernels(monkeypatch, "auto")
    reference = _generate(official_tiny, cache_implementation="dynamic")  # transformers' own loop
    assert torch.equal(_generate(official_tiny), reference)  # plain generate() on CUDA: static with graphs
    for graphs in ("1", "0"):
        monkeypatch.setenv(CUDA_GRAPHS_ENV, graphs)
        for draft_tokens in (0, 2):
            out = _generate(official_tiny, cache_implementation="static", mtp_draft_tokens=draft_tokens)
            assert torch.equal(out, reference), (graphs, draft_tokens)


def test_a_graph_replay_equals_the_eager_block(official_tiny):
    from transformers_qwen35.core.cache import Qwen3_5HybridCache
    from transformers_qwen35.generation.static_decode import GraphedBlock, StaticHybridCache, forward_block

    model = official_tiny
    ids, mask = _batch()
    with torch.no_grad():
        dynamic = Qwen3_5HybridCache(model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=dynamic, use_cache=True)
        eager = StaticHybridCache.from_prefill(dynamic, mask.bool(), 64, model.config)
        graphed = StaticHybridCache.from_prefill(dynamic, mask.bool(), 64, model.config)
        runner = GraphedBlock(model, graphed, 1)
        position = mask.sum(-1, keepdim=True)
        for step in range(4):
            block = _ids(3, 1, seed=10 + step)
            rope = position[None].expand(3, -1, -1)
            expected = forward_block(model, eager, block, rope)
            got = runner(block, rope)
            assert relative_error(got, expected) < 1e-5, step
            eager.advance(1)
            graphed.advance(1)
            position = position + 1


@pytest.mark.parametrize("dtype, padded", [(torch.float32, False), (torch.bfloat16, True)])
def test_graphed_training_steps_equal_eager_steps_on_fla(monkeypatch, dtype, padded):
    """training/graphs.py with real CUDA graphs: per-step losses and gradients (two micro-batches accumulated per
    step; padded: every batch left-padded by a different amount) of the graphed model equal those of an eager copy;
    the graphs were captured once and replayed."""
    import copy
    import gc
    import weakref

    from transformers_qwen35.training import graphs as training_graphs

    _with_kernels(monkeypatch, "fla")
    graphed, _ = _pair(dtype=dtype, seed=2, attn_implementation="sdpa")  # eager attention takes a mask: not graphed
    graphed.train()
    eager = copy.deepcopy(graphed)
    batches = [_ids(2, 200, seed=20 + i % 3) for i in range(8)]  # the backward test's shape: its autotuning is kept

    def steps(model, enabled):
        monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "1" if enabled else "0")
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        losses, grads = [], []
        for index, batch in enumerate(batches):
            mask = torch.ones_like(batch)
            if padded:
                mask[0, : 3 + index] = 0
            loss = model(batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
            (loss / 2).backward()
            losses.append(loss.detach().float().reshape(1))
            if index % 2:
                grads.append(torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]))
                optimizer.step()
                optimizer.zero_grad()
        return torch.cat(losses), grads

    graphed_losses, graphed_grads = steps(graphed, True)
    state = training_graphs._STATES[graphed.model]
    (replays,) = state.graphs.values()
    assert state.captures == 1 and not state.disabled and replays.replays == len(batches) - 1
    eager_losses, eager_grads = steps(eager, False)
    # The graphs hold no reference to the model: it goes when its last user reference does.
    alive = weakref.ref(graphed.model)  # the text model: the graphs are kept per text model
    del graphed, state, replays
    gc.collect()
    assert alive() is None, "the training graphs keep the model alive"
    bar = 1e-4 if dtype == torch.float32 else 2e-2  # the same kernels; bf16 may round a reduction differently
    assert _rms_error(graphed_losses, eager_losses) < bar
    for step, (got, expected) in enumerate(zip(graphed_grads, eager_grads)):
        assert _rms_error(got, expected) < bar, step
