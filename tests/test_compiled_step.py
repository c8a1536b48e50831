"""Compiled CPU decoding (generation/compiled_step.py): ``generate(..., compile_config=CompileConfig())`` runs the
static decoding block through ``torch.compile`` as one graph, gives the eager loop's tokens (float32: exactly; packed
bf16 / int8 / int4: the eager block's hidden states within rounding), compiles once for repeated calls, honours
``disable_compile``, and decodes eagerly after one warning when compilation fails.

The first tests compile with a recording backend that runs the captured graph as it is (fast, exact); the last ones
with inductor, as users get it (each ~10-20 s on 2 cores)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from conftest import generate_tokens, left_padded_prompts, relative_error, write_untied_tiny_checkpoint
from transformers import AutoModelForCausalLM, CompileConfig, GenerationConfig

from transformers_qwen35 import pack_for_cpu
from transformers_qwen35.core.cache import Qwen3_5HybridCache
from transformers_qwen35.generation import compiled_step
from transformers_qwen35.generation.static_decode import StaticHybridCache, forward_block, release_static_cache
from transformers_qwen35.kernels.cpu_linear import bf16_packing_supported

VOCAB = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_untied_tiny_checkpoint(tmp_path_factory.mktemp("compiled"), seed=7, vocab_size=VOCAB)


@pytest.fixture
def model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


class RecordingBackend:
    """A torch.compile backend that records each graph it is given and runs it unchanged."""

    def __init__(self):
        self.graphs = []

    def __deepcopy__(self, memo):  # generate() deep-copies the model's generation config: keep one record
        return self

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


def test_compiled_step_gives_the_eager_tokens_and_compiles_once(model):
    ids, mask = left_padded_prompts()
    reference = generate_tokens(model, ids, mask, cache_implementation="static")
    backend = RecordingBackend()
    settings = dict(compile_config=CompileConfig(backend=backend))
    assert torch.equal(generate_tokens(model, ids, mask, **settings), reference)
    # One graph: the whole block (fullgraph), reused by every step and by the next call.
    assert len(backend.graphs) == 1 and not compiled_step.compilation_failed(model)
    calls = sum(node.op == "call_function" for node in backend.graphs[0].graph.nodes)
    assert calls > 100  # the layers' ops, not an empty graph around a fallback
    assert torch.equal(generate_tokens(model, ids, mask, **settings), reference)
    assert len(backend.graphs) == 1
    # A longer reply needs a larger static cache (256 -> 512 positions): the capacity is a dynamic dimension of
    # the one graph, so this does not recompile either.
    longer = generate_tokens(model, ids, mask, max_new_tokens=260, **settings)
    assert torch.equal(longer, generate_tokens(model, ids, mask, max_new_tokens=260, cache_implementation="static"))
    assert len(backend.graphs) == 1


def test_compile_config_on_the_generation_config_and_disable_compile(model):
    ids, mask = left_padded_prompts(seed=1)
    reference = generate_tokens(model, ids, mask)  # transformers' own loop: compile_config not set yet
    backend = RecordingBackend()
    model.generation_config.compile_config = CompileConfig(backend=backend)
    assert torch.equal(generate_tokens(model, ids, mask, disable_compile=True), reference)
    assert backend.graphs == []
    assert torch.equal(generate_tokens(model, ids, mask), reference)
    assert len(backend.graphs) == 1


def test_a_failed_compilation_warns_once_and_decodes_eagerly(model, caplog):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler here")

    ids, mask = left_padded_prompts(seed=2)
    reference = generate_tokens(model, ids, mask, cache_implementation="static")
    settings = dict(compile_config=CompileConfig(backend=failing_backend))
    with caplog.at_level(logging.WARNING, logger="transformers_qwen35"):
        assert torch.equal(generate_tokens(model, ids, mask, **settings), reference)
        assert torch.equal(generate_tokens(model, ids, mask, **settings), reference)
    warnings = [r.getMessage() for r in caplog.records if "could not compile the decoding step" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0], warnings
    assert compiled_step.compilation_failed(model)


def test_compile_arguments_only_on_the_cpu_and_only_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiled_step.compile_arguments(GenerationConfig(), cpu) is None
    asked = GenerationConfig(compile_config=CompileConfig())
    assert compiled_step.compile_arguments(asked, cuda) is None  # CUDA replays CUDA graphs instead
    arguments = compiled_step.compile_arguments(asked, cpu)
    assert arguments == {"backend": "inductor", "dynamic": None, "fullgraph": True}  # no CUDA-graph mode on the CPU
    asked.disable_compile = True
    assert compiled_step.compile_arguments(asked, cpu) is None


# --- inductor, as users get it ------------------------------------------------------------------------------------


def test_inductor_float32_gives_the_eager_tokens(model):
    ids, mask = left_padded_prompts(seed=3)
    reference = generate_tokens(model, ids, mask, cache_implementation="static")
    release_static_cache(model)
    assert torch.equal(generate_tokens(model, ids, mask, compile_config=CompileConfig()), reference)


def _block_outputs(model, step, steps: int = 3):
    """Hidden states of ``steps`` single-token blocks after a shared prompt, through ``step`` (forward_block or a
    compiled one), on a static cache of its own."""
    config = model.config
    ids, mask = left_padded_prompts(batch=2, seed=4)
    cache = Qwen3_5HybridCache(config)
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        static = StaticHybridCache.from_prefill(cache, mask.bool(), 256, config)
        positions = mask.sum(-1)
        outputs = []
        for offset in range(steps):
            token = torch.full((2, 1), 11 + offset)
            rope = (positions[:, None] + offset).unsqueeze(0).expand(3, -1, -1)
            outputs.append(step(model, static, token, rope).float())
            static.advance(1)
    return torch.stack(outputs)


@pytest.mark.skipif(not bf16_packing_supported(), reason="this CPU has no native bf16 products")
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_inductor_packed_block_matches_the_eager_block(checkpoint, weights):
    """Inductor keeps fp32 between the ops it fuses where eager rounds each to bf16: the compiled block is as close
    to the float32 model as the eager block is, and within bf16 rounding of it."""
    exact = _block_outputs(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval(), forward_block)
    model = pack_for_cpu(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval(), weights)
    eager = _block_outputs(model, forward_block)
    compiled = _block_outputs(
        model, compiled_step.compiled_forward_block(model, {"backend": "inductor", "fullgraph": True})
    )
    assert relative_error(compiled, eager) < 3e-2
    assert relative_error(compiled, exact) < 1.5 * relative_error(eager, exact) + 1e-2


def test_threads_sharing_a_compiled_model_each_get_their_own_tokens(model):
    """Two threads decode different prompts on one model at once: one holds the model's static cache, the other gets
    a private one; both run the model's one compiled block and give what each gives alone."""
    backend = RecordingBackend()
    model.generation_config.compile_config = CompileConfig(backend=backend)
    prompts = [left_padded_prompts(seed=seed) for seed in (5, 6)]
    alone = [generate_tokens(model, ids, mask, max_new_tokens=40) for ids, mask in prompts]
    results = [None, None]

    def decode(index):
        ids, mask = prompts[index]
        results[index] = generate_tokens(model, ids, mask, max_new_tokens=40)

    threads = [threading.Thread(target=decode, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(torch.equal(result, expected) for result, expected in zip(results, alone))
    # Both ran compiled. (Under a loaded machine dynamo was once seen compiling the block a second time while the
    # threads overlapped; which graph ran does not change the tokens, which is what this test is about.)
    assert backend.graphs and not compiled_step.compilation_failed(model)
