"""Graphed training steps (training/graphs.py) on CPU: the capture replaced by one that replays by running the
captured function again, writing into the tensors the capture returned, as a CUDA graph overwrites its memory. What
runs here is everything around the graphs: when they are used, the autograd plumbing, gradient accumulation, the
shape cache and the ways back to eager steps. The real capture is tested in tests/gpu."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import HostSyncs, Qwen3_5ForCausalLM, Qwen3_5TextConfig, install_exact_fake_fla, tiny_text_kwargs
from transformers.utils import logging as hf_logging

from transformers_qwen35.training import graphs as training_graphs


class ReplayingGraph:
    def __init__(self, function, result):
        self.function, self.result, self.replays = function, result, 0

    def replay(self):
        with torch.enable_grad():  # a real replay runs the recorded kernels whatever the grad mode (in a Function: off)
            fresh = self.function()
        if self.result is not None:
            for old, new in zip(self.result, fresh):
                if old is not None:
                    old.copy_(new)
        self.replays += 1

    def pool(self):
        return None


def replaying_capture(function, pool=None):
    result = function()
    return ReplayingGraph(function, result), result


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "1")
    monkeypatch.setattr(training_graphs, "_graphable", lambda tensor: True)
    monkeypatch.setattr(training_graphs, "_on_side_stream", lambda device, function: function())
    monkeypatch.setattr(training_graphs, "_capture", replaying_capture)


def tiny_model(seed: int = 0) -> Qwen3_5ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**tiny_text_kwargs(), attn_implementation="sdpa"))
    with torch.no_grad():  # away from the initialisation's zeros and ones, so every gradient is non-trivial
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.train()


def ids(length: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def graph_state(model):
    return training_graphs._STATES.get(model.model)


def train(model, batches, accumulate: int = 1) -> list[float]:
    """SGD steps over ``batches`` (``accumulate`` micro-batches per step); the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for index, batch in enumerate(batches):
        loss = model(input_ids=batch, labels=batch).loss
        (loss / accumulate).backward()
        losses.append(loss.item())
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("frozen", [False, True])
def test_graphed_steps_train_exactly_as_eager_steps(graphs_on_cpu, monkeypatch, accumulate, frozen):
    graphed = tiny_model()
    if frozen:  # the embedding (so the stack's input needs no gradient) and one layer frozen, as with adapters
        for param in [*graphed.model.embed_tokens.parameters(), *graphed.model.layers[1].parameters()]:
            param.requires_grad_(False)
    eager = copy.deepcopy(graphed)
    batches = [ids(seed=i % 3) for i in range(6)]

    graphed_losses = train(graphed, batches, accumulate)
    state = graph_state(graphed)
    assert state.captures == 1 and not state.disabled
    (replayed,) = state.graphs.values()
    assert replayed.replays == len(batches) - 1  # the first step ran eagerly; the second captured
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "0")
    eager_losses = train(eager, batches, accumulate)
    assert graph_state(eager) is None

    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-6, atol=1e-6)
    for (name, param), reference in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6, msg=name)
    changed = any(
        not torch.equal(param, start) for param, start in zip(graphed.parameters(), tiny_model().parameters())
    )
    assert changed


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padded_batches_of_one_length_share_a_capture_and_train_exactly(
    graphs_on_cpu, monkeypatch, attn_implementation
):
    graphed = tiny_model()
    graphed.config._attn_implementation = attn_implementation
    eager = copy.deepcopy(graphed)
    batches = []
    for index in range(5):  # left and right padding, different amounts: the mask's values change, not its shape
        batch = ids(seed=index)
        mask = torch.ones_like(batch)
        mask[0, : 1 + index] = 0
        mask[1, -index:] = 0 if index else 1
        batches.append((batch.masked_fill(mask == 0, 0), mask))

    def steps(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for batch, mask in batches:
            loss = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
        return losses

    graphed_losses = steps(graphed)
    state = graph_state(graphed)
    assert state.captures == 1 and next(iter(state.graphs.values())).replays == len(batches) - 1
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "0")
    torch.testing.assert_close(graphed_losses, steps(eager), rtol=1e-6, atol=1e-6)
    for param, reference in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6)


def test_a_second_forward_before_the_backward_runs_eagerly(graphs_on_cpu):
    graphed = tiny_model()
    eager = copy.deepcopy(graphed)
    first, second = ids(seed=1), ids(seed=2)
    for _ in range(2):  # seen, then captured: the graph is warm
        graphed(input_ids=first, labels=first).loss.backward()
    graphed.zero_grad()
    replays = next(iter(graph_state(graphed).graphs.values()))
    before = replays.replays

    loss = graphed(input_ids=first, labels=first).loss + graphed(input_ids=second, labels=second).loss
    loss.backward()
    assert replays.replays == before + 1  # the second forward did not overwrite the first's activations

    reference = eager(input_ids=first, labels=first).loss + eager(input_ids=second, labels=second).loss
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for param, ref in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_an_unused_replay_without_backward_frees_the_graph(graphs_on_cpu):
    model = tiny_model()
    batch = ids()
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
    replays = next(iter(graph_state(model).graphs.values()))
    model(input_ids=batch, labels=batch)  # forward only, result dropped: its backward can never come
    assert not replays.busy()
    loss = model(input_ids=batch, labels=batch).loss
    assert replays.busy()
    loss.backward()
    assert not replays.busy()


def test_a_second_backward_after_a_newer_replay_raises(graphs_on_cpu):
    model = tiny_model()
    batch = ids()
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
    old = model(input_ids=batch, labels=batch).loss
    old.backward(retain_graph=True)
    model(input_ids=batch, labels=batch).loss.backward()
    with pytest.raises(RuntimeError, match="second backward"):
        old.backward()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "Graphed" in r.getMessage()]


@pytest.fixture
def warnings_propagate():
    hf_logging.enable_propagation()
    yield
    hf_logging.disable_propagation()


def test_changing_shapes_stop_the_graphs_after_a_few_captures(graphs_on_cpu, monkeypatch, caplog, warnings_propagate):
    monkeypatch.setattr(training_graphs, "MAX_CAPTURES", 3)
    model = tiny_model()
    with caplog.at_level(logging.WARNING):
        for length in (8, 8, 9, 9, 10, 10, 11, 11, 12, 12):
            batch = ids(length)
            model(input_ids=batch, labels=batch).loss.backward()
    state = graph_state(model)
    assert state.captures == 3 and state.disabled and not state.graphs
    assert len(_warnings(caplog)) == 1 and "one length" in _warnings(caplog)[0]
    assert len(state.seen) == 4  # 12 never reached the graphs


def test_at_most_two_shapes_keep_their_graphs(graphs_on_cpu):
    model = tiny_model()
    for length in (8, 8, 9, 9, 10, 10, 8):
        batch = ids(length)
        model(input_ids=batch, labels=batch).loss.backward()
    state = graph_state(model)
    assert len(state.graphs) == training_graphs.MAX_SHAPES
    assert [key[0][0][0][1] for key in state.graphs] == [10, 8]  # 8 evicted for 10, then 9 for 8's second capture
    assert state.captures == 4


def test_a_failed_capture_trains_on_eagerly(graphs_on_cpu, monkeypatch, caplog, warnings_propagate):
    def failing_capture(function, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(training_graphs, "_capture", failing_capture)
    graphed = tiny_model()
    eager = copy.deepcopy(graphed)
    batches = [ids(seed=i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        losses = train(graphed, batches)
    assert graph_state(graphed).disabled
    assert "capturing the decoder failed" in _warnings(caplog)[0]
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "0")
    torch.testing.assert_close(losses, train(eager, batches))
    for param, reference in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(param, reference)


@pytest.mark.parametrize(
    "case", ["env off", "eval", "no grad", "packed", "checkpointing", "hook", "hidden states", "flash", "frozen stack"]
)
def test_batches_a_graph_cannot_replay_exactly_stay_eager(graphs_on_cpu, monkeypatch, case):
    def no_graphs(*args, **kwargs):
        raise AssertionError("graphed where it must not be")

    monkeypatch.setattr(training_graphs, "run", no_graphs)
    model = tiny_model()
    batch = ids()
    kwargs = dict(input_ids=batch, labels=batch)
    if case == "env off":
        monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "0")
    elif case == "eval":
        model.eval()
    elif case == "flash":  # flash attention unpads on the host; only the check, as flash_attn is not installed
        model.config._attn_implementation = "flash_attention_2"
        hidden = model.model.embed_tokens(batch)
        assert not training_graphs.can_graph(
            model.model, hidden, cache=None, segments=None, output_hidden_states=False, output_attentions=False
        )
        return
    elif case == "packed":
        kwargs["position_ids"] = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, -1)
    elif case == "checkpointing":
        model.gradient_checkpointing_enable()
    elif case == "hook":
        model.model.layers[2].mlp.register_forward_hook(lambda *args: None)
    elif case == "hidden states":
        kwargs["output_hidden_states"] = True
    elif case == "frozen stack":  # only the output head trains: no backward through the stack to graph
        for param in model.model.parameters():
            param.requires_grad_(False)
    with torch.set_grad_enabled(case != "no grad"):
        model(**kwargs)
    # and the same model, without the condition, is graphed (the check above is not vacuous)
    if case not in ("env off", "hook", "checkpointing", "frozen stack"):  # conditions of the call, not the model
        model.train()
        monkeypatch.undo()
        monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "1")
        monkeypatch.setattr(training_graphs, "_graphable", lambda tensor: True)
        monkeypatch.setattr(training_graphs, "run", no_graphs)
        with pytest.raises(AssertionError, match="graphed where"):
            model(input_ids=batch, labels=batch)


@pytest.mark.parametrize("kernels", ["torch", "fla"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_what_a_graph_captures_never_waits_for_the_device(graphs_on_cpu, monkeypatch, attn_implementation, kernels):
    """The captured forward and backward (of a padded batch) read no tensor's value on the host: on CUDA such a read
    fails the capture. On our PyTorch ops, and on fla's path with a stand-in for its kernels (conftest): our code
    around them (the real kernels' own code is run in tests/gpu)."""
    calls = []
    if kernels == "fla":
        monkeypatch.setenv("TRANSFORMERS_QWEN35_KERNELS", "fla")
        calls = install_exact_fake_fla(monkeypatch)
    syncs = HostSyncs()

    def watched_capture(function, pool=None):
        with syncs:
            return replaying_capture(function, pool)

    monkeypatch.setattr(training_graphs, "_capture", watched_capture)
    model = tiny_model()
    model.config._attn_implementation = attn_implementation
    batch = ids()
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    for _ in range(3):  # seen, captured, replayed
        model(input_ids=batch, attention_mask=mask, labels=batch).loss.backward()
    assert graph_state(model).captures == 1
    assert syncs.found == []
    taken = {kernel for kernel, _, _ in calls}
    assert taken >= {"chunk", "conv", "add_rms_norm", "swiglu"} if kernels == "fla" else not taken
    with syncs:  # the detector itself: the eager forward reads the mask once (is any position padded?)
        model.eval()
        model(input_ids=batch, attention_mask=mask)
    assert syncs.found


def test_the_graphed_stack_is_the_eager_forward(graphs_on_cpu):
    """decoder_stack (what a graph captures) gives the ordinary forward's last hidden state."""
    model = tiny_model()
    batch = ids()
    eager_output = model.model(input_ids=batch, output_hidden_states=True)  # eager: hidden states asked for
    hidden = model.model.embed_tokens(batch)
    positions = torch.arange(batch.shape[1]).expand(3, *batch.shape)
    cos, sin = model.model.rotary_emb(hidden, positions)
    torch.testing.assert_close(
        training_graphs.decoder_stack(model.model, hidden, cos, sin), eager_output.last_hidden_state
    )


def test_on_cpu_without_the_test_doubles_nothing_is_graphed(monkeypatch):
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "1")
    model = tiny_model()
    batch = ids()
    model(input_ids=batch, labels=batch).loss.backward()
    model(input_ids=batch, labels=batch).loss.backward()
    assert graph_state(model) is None


def test_the_graphs_do_not_keep_the_model_alive(graphs_on_cpu, monkeypatch):
    """Graphs are kept per model in a weak mapping; a capture holding the model would keep it for good. (The stand-in
    graph above holds the captured function, which does; a CUDA graph holds no Python objects: so does this one.)"""
    import gc
    import weakref

    class OpaqueGraph:
        def pool(self):
            return None

        def replay(self):
            pass

    monkeypatch.setattr(training_graphs, "_capture", lambda function, pool=None: (OpaqueGraph(), function()))
    model = tiny_model()
    batch = ids()
    for _ in range(2):
        model(input_ids=batch, labels=batch)
    assert graph_state(model).captures == 1
    alive = weakref.ref(model.model)  # the text model: the graphs are kept per text model
    del model
    gc.collect()
    assert alive() is None


def test_lora_adapters_train_exactly_and_an_adapter_switch_gets_its_own_capture(graphs_on_cpu, monkeypatch):
    """PEFT LoRA on the stack (base frozen, the stack's input needs no gradient): the adapters' gradients through the
    graphs equal eager ones, and switching to another adapter (a Python switch the graph cannot see) is a new
    capture, not a replay of the first adapter's graph. (Disabling all adapters leaves nothing to train in the
    stack: PEFT then freezes them, and those steps run eagerly.)"""
    from peft import LoraConfig, get_peft_model

    from transformers_qwen35 import lora_target_modules

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_target_modules("all"))
    graphed = get_peft_model(tiny_model(), config)
    graphed.add_adapter("second", config)
    eager = copy.deepcopy(graphed)
    batches = [ids(seed=i) for i in range(4)]

    def steps(model):
        model.set_adapter("default")
        losses = train(model, batches)
        model.set_adapter("second")
        return losses + train(model, batches[:3])  # seen, captured, replayed: the second adapter's own graph

    graphed_losses = steps(graphed)
    state = graph_state(graphed.base_model.model)
    assert state.captures == 2 and len(state.graphs) == 2
    monkeypatch.setenv(training_graphs.TRAINING_GRAPHS_ENV, "0")
    torch.testing.assert_close(graphed_losses, steps(eager), rtol=1e-6, atol=1e-6)
    for (name, param), reference in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6, msg=name)
    assert any("lora_B.second" in n and p.abs().sum() > 0 for n, p in graphed.named_parameters())  # starts at 0
