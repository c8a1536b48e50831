"""The chunked training loss (chunked_loss.py): the same loss and gradients as the full-logits path and as built-in
transformers, with several chunks running, on both of its paths (fused: gradients computed in the forward;
checkpointed: lm_head called per chunk and recomputed in backward), and no full-vocabulary logits tensor ever
allocated."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, build_pair, build_vl_pair, random_pixels, relative_error, vision_run
from torch.utils._python_dispatch import TorchDispatchMode

from transformers_qwen35.training import chunked_loss
from transformers_qwen35.training.chunked_loss import (
    CHUNK_ELEMENTS,
    FusedLinearCrossEntropy,
    causal_lm_loss,
    chunk_rows,
    fusable,
)

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
CHUNK = 5  # 2 x 37 = 74 positions: 15 chunks, one of them short
PATHS = ("fused", "checkpointed")


@pytest.fixture
def taken(monkeypatch):
    """Counts of the paths causal_lm_loss took: fused forwards, checkpointed chunks, lm_head calls under no_grad."""
    counts = {"fused": 0, "checkpointed": 0, "plain": 0}
    fused_forward = FusedLinearCrossEntropy.forward
    real_checkpoint, real_chunk = chunked_loss.checkpoint, chunked_loss._summed_cross_entropy

    def fused(ctx, *args):
        counts["fused"] += 1
        return fused_forward(ctx, *args)

    def checkpointed(*args, **kwargs):
        counts["checkpointed"] += 1
        return real_checkpoint(*args, **kwargs)

    def plain(*args):
        counts["plain"] += not torch.is_grad_enabled()
        return real_chunk(*args)

    monkeypatch.setattr(FusedLinearCrossEntropy, "forward", staticmethod(fused))
    monkeypatch.setattr(chunked_loss, "checkpoint", checkpointed)
    monkeypatch.setattr(chunked_loss, "_summed_cross_entropy", plain)
    return counts


def _use_path(head: torch.nn.Module, path: str) -> None:
    """``checkpointed``: a forward hook that changes nothing, which rules the fused path out (it never calls the
    head, so it would skip the hook)."""
    assert fusable(head)
    if path == "checkpointed":
        head.register_forward_hook(lambda module, args, output: None)
        assert not fusable(head)


def _assert_took(taken, path: str) -> None:
    other = PATHS[1 - PATHS.index(path)]
    assert taken[path] > 0 and taken[other] == 0, taken
    taken.update(fused=0, checkpointed=0, plain=0)


def _ids(batch=2, length=37, seed=1, vocab=99):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _labels(ids):
    """A masked prompt in every row, and in row 0 a masked stretch that covers whole chunks (positions 10..29)."""
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, 10:31] = -100
    return labels


def _step(model, zero=True, **inputs):
    """One forward + backward in training mode: (output, {name: gradient})."""
    model.train()
    if zero:
        model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return output, grads


def _assert_same(loss, grads, reference_loss, reference_grads, grad_tol=GRAD_TOL):
    assert relative_error(loss, reference_loss) < LOSS_TOL
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        assert relative_error(grad, reference_grads[name]) < grad_tol, name


# --- loss semantics ---------------------------------------------------------------------------------------------


def test_chunk_rows_bounds_a_chunks_fp32_logits():
    assert chunk_rows(248320) * 248320 <= CHUNK_ELEMENTS < (chunk_rows(248320) + 1) * 248320
    assert chunk_rows(248320) == 270
    assert chunk_rows(10**9) == 1  # at least one row, whatever the vocabulary
    assert chunk_rows(99, elements=990) == 10


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
def test_loss_and_every_gradient_match_unchunked_and_builtin(config, path, taken):
    """Tied and untied heads: with the tied one the embedding's gradient is the sum over both of its uses."""
    ours, native = build_pair(**TINY_CONFIGS[config])
    ours.loss_chunk_size = CHUNK
    _use_path(ours.lm_head, path)
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids))
    chunked, chunked_grads = _step(ours, **inputs)
    _assert_took(taken, path)
    assert chunked.logits is None  # training with labels: the logits are skipped
    full, full_grads = _step(ours, **inputs, skip_logits=False)
    assert full.logits is not None and full.logits.shape == (2, 37, 99)
    builtin, builtin_grads = _step(native, **inputs)
    assert len(chunked_grads) == len(list(ours.parameters()))
    _assert_same(chunked.loss, chunked_grads, full.loss, full_grads)
    _assert_same(chunked.loss, chunked_grads, builtin.loss, builtin_grads)


@pytest.mark.parametrize("items", [50, "tensor"])
def test_num_items_in_batch_divides_the_summed_loss(items):
    ours, native = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    items = torch.tensor(50) if items == "tensor" else items
    inputs = dict(input_ids=ids, labels=_labels(ids), num_items_in_batch=items)
    chunked, chunked_grads = _step(ours, **inputs)
    builtin, builtin_grads = _step(native, **inputs)
    _assert_same(chunked.loss, chunked_grads, builtin.loss, builtin_grads)
    mean, _ = _step(ours, input_ids=ids, labels=_labels(ids))
    counted = int((_labels(ids)[:, 1:] != -100).sum())
    assert relative_error(chunked.loss * 50, mean.loss * counted) < LOSS_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_num_items_in_batch_on_another_device():
    ours, native = build_pair()
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids), num_items_in_batch=torch.tensor(50, device="cuda"))
    chunked, _ = _step(ours, **inputs)
    builtin, _ = _step(native, **inputs)
    assert chunked.loss.device.type == "cpu"
    assert relative_error(chunked.loss, builtin.loss) < LOSS_TOL


def test_shift_labels_are_used_as_given():
    ours, native = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    shifted = _ids(seed=5)  # unrelated to ids, so a loss that shifted the labels itself would differ
    shifted[:, -6:] = -100
    inputs = dict(input_ids=ids, labels=ids, shift_labels=shifted)
    chunked, chunked_grads = _step(ours, **inputs)
    builtin, builtin_grads = _step(native, **inputs)
    _assert_same(chunked.loss, chunked_grads, builtin.loss, builtin_grads)
    plain, _ = _step(ours, input_ids=ids, labels=ids)
    assert relative_error(chunked.loss, plain.loss) > 1e-3


def test_logits_to_keep_takes_labels_of_the_kept_positions():
    ours, native = build_pair()
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids)[:, -12:], logits_to_keep=12)
    chunked, chunked_grads = _step(ours, **inputs)
    builtin, builtin_grads = _step(native, **inputs)
    _assert_same(chunked.loss, chunked_grads, builtin.loss, builtin_grads)
    for model in (ours, native):  # labels for every position do not line up with 12 kept ones, in both
        with pytest.raises(ValueError):
            model.train()(input_ids=ids, labels=ids, logits_to_keep=12)


@pytest.mark.parametrize("items", [None, 7])
def test_no_counted_position_gives_what_builtin_gives(items):
    """All labels ignored: NaN as the mean of nothing, 0 with num_items_in_batch; backward still runs (zero)."""
    ours, native = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    inputs = dict(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=items)
    chunked, chunked_grads = _step(ours, **inputs)
    builtin, _ = _step(native, **inputs)
    if items is None:
        assert torch.isnan(chunked.loss) and torch.isnan(builtin.loss)
    else:
        assert chunked.loss.item() == builtin.loss.item() == 0.0
    assert all(grad.abs().max() == 0 for grad in chunked_grads.values())


@pytest.mark.parametrize("path", PATHS)
def test_function_equals_for_causal_lm_loss_directly(path, taken):
    """The function alone, against transformers' ForCausalLMLoss on an arbitrary head (with a bias) and
    ignore_index, whichever of hidden states, weight and bias require a gradient."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    _use_path(head, path)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[1] = 7  # ignore_index 7: a whole row counts for nothing
    expected = ForCausalLMLoss(head(hidden), labels, 50, ignore_index=7)
    expected_grads = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
    for chunk in (1, 4, 33, 1000):
        loss = causal_lm_loss(hidden, head, labels, 50, ignore_index=7, chunk_size=chunk, unused_keyword=1)
        grads = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
        assert relative_error(loss, expected) < LOSS_TOL
        for grad, reference in zip(grads, expected_grads):
            assert relative_error(grad, reference) < GRAD_TOL
    _assert_took(taken, path)
    # Each of hidden, weight, bias frozen in turn (a frozen head under LoRA, an input that needs no gradient).
    for frozen in range(3):
        inputs = [hidden.detach().requires_grad_(frozen != 0)]
        head.weight.requires_grad_(frozen != 1)
        head.bias.requires_grad_(frozen != 2)
        trained = [tensor for tensor in (inputs[0], head.weight, head.bias) if tensor.requires_grad]
        loss = causal_lm_loss(inputs[0], head, labels, 50, ignore_index=7, chunk_size=4)
        grads = torch.autograd.grad(loss, trained)
        references = [reference for index, reference in enumerate(expected_grads) if index != frozen]
        assert relative_error(loss, expected) < LOSS_TOL and len(grads) == 2
        for grad, reference in zip(grads, references):
            assert relative_error(grad, reference) < GRAD_TOL
    head.requires_grad_(False)
    loss = causal_lm_loss(hidden.detach(), head, labels, 50, ignore_index=7, chunk_size=4)
    assert not loss.requires_grad and relative_error(loss, expected) < LOSS_TOL  # nothing to differentiate
    _assert_took(taken, path)
    head.requires_grad_(True)
    # No position: 0 / 0, still tied to the graph, with zero gradients.
    empty = causal_lm_loss(hidden[:, :0], head, labels[:, :0], 50, chunk_size=4)
    assert torch.isnan(empty)
    assert all(grad.abs().max() == 0 for grad in torch.autograd.grad(empty, [head.weight, head.bias]))
    with pytest.raises(ValueError):
        causal_lm_loss(hidden, head, labels, 49)


def test_under_no_grad_neither_path_runs_and_the_loss_is_the_same(taken):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, labels = torch.randn(2, 9, 16), torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        evaluated = causal_lm_loss(hidden, head, labels, 50, chunk_size=4)
    assert taken == {"fused": 0, "checkpointed": 0, "plain": 5}  # 18 positions, 4 per chunk
    trained = causal_lm_loss(hidden, head, labels, 50, chunk_size=4)
    assert taken["fused"] == 1 and relative_error(evaluated, trained) < LOSS_TOL


@pytest.mark.parametrize("grouped_chunks", [None, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, "autocast"])
def test_low_precision_fused_matches_checkpointed(dtype, grouped_chunks, taken, monkeypatch):
    """A bf16 head (the gradients come back in bf16), and an fp32 head under CPU bf16 autocast (logits computed in
    bf16 as F.linear would, fp32 gradients): the fused path against the checkpointed one, to bf16 rounding. The
    fused path's sums over chunks are in fp32, the checkpointed path's in bf16, so both are also compared with the
    fp32 result. CHUNK_ELEMENTS is lowered so that the fused path's fp32 weight-gradient blocks are several (70 rows
    each, the last one short); GROUP_ELEMENTS so that the weight gradient is accumulated per group of 3 chunks of 7
    rows (the last group short), or once for all 12 chunks (its default at this vocabulary)."""
    torch.manual_seed(0)
    vocab, width = 300, 64
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 70 * width)
    if grouped_chunks:
        monkeypatch.setattr(chunked_loss, "GROUP_ELEMENTS", grouped_chunks * 7 * vocab)
    assert len(chunked_loss._vocab_spans(vocab, width, in_place=False)) == 5
    labels = torch.randint(0, vocab, (2, 40))
    labels[0, :10] = -100
    base_hidden, base_head = torch.randn(2, 40, width), torch.nn.Linear(width, vocab, bias=True)
    results = {}
    for path in ("fp32",) + PATHS:
        head = torch.nn.Linear(width, vocab, bias=True)
        head.load_state_dict(base_head.state_dict())
        hidden = base_hidden.clone()
        if dtype == torch.bfloat16 and path != "fp32":
            head, hidden = head.to(dtype), hidden.to(dtype)
        hidden.requires_grad_(True)
        if path != "fp32":
            _use_path(head, path)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast" and path != "fp32"):
            loss = causal_lm_loss(hidden, head, labels, vocab, chunk_size=7)
        loss.backward()
        if path != "fp32":
            _assert_took(taken, path)
        expected_dtype = dtype if dtype == torch.bfloat16 and path != "fp32" else torch.float32
        assert loss.dtype == torch.float32
        assert {hidden.grad.dtype, head.weight.grad.dtype, head.bias.grad.dtype} == {expected_dtype}
        results[path] = [loss, hidden.grad, head.weight.grad, head.bias.grad]
    for fused, checkpointed, exact in zip(results["fused"], results["checkpointed"], results["fp32"]):
        assert relative_error(fused, checkpointed) < 2e-2
        assert relative_error(fused, exact) < 2e-2 and relative_error(checkpointed, exact) < 2e-2


# --- when logits are skipped ------------------------------------------------------------------------------------


def test_logits_are_skipped_only_in_training_with_labels_unless_forced():
    ours, _ = build_pair()
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    with torch.no_grad():
        ours.train()
        assert ours(ids, labels=ids).logits is None
        assert ours(ids).logits.shape == (2, 37, 99)  # no labels: nothing to skip for
        train_full = ours(ids, labels=ids, skip_logits=False)
        ours.eval()
        evaluated = ours(ids, labels=ids)  # eval (Trainer.prediction_step) gets logits and the loss
        forced = ours(ids, labels=ids, skip_logits=True)
    assert train_full.logits is not None and evaluated.logits is not None and forced.logits is None
    assert relative_error(forced.loss, evaluated.loss) < LOSS_TOL
    assert relative_error(train_full.loss, evaluated.loss) < LOSS_TOL
    with pytest.raises(ValueError, match="needs labels"):
        ours(ids, skip_logits=True)
    ours.skip_logits_in_training = False  # for trainers that read the logits in training (TRL's SFTTrainer)
    with torch.no_grad():
        kept = ours.train()(ids, labels=ids)
        forced = ours(ids, labels=ids, skip_logits=True)
    assert kept.logits is not None and forced.logits is None
    assert relative_error(forced.loss, kept.loss) < LOSS_TOL


def test_a_custom_loss_function_keeps_the_logits():
    ours, _ = build_pair()
    ids = _ids()
    seen = []

    def custom(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().mean()

    ours.loss_function = custom
    ours.train()
    output = ours(ids, labels=ids)
    assert output.logits is not None and seen == [(2, 37, 99)]
    with pytest.raises(ValueError, match="custom loss"):
        ours(ids, labels=ids, skip_logits=True)


# --- training setups --------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    ours, _ = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids), use_cache=False)
    plain, plain_grads = _step(ours, **inputs)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_grads = _step(ours, **inputs)
    assert checkpointed.logits is None
    _assert_same(checkpointed.loss, checkpointed_grads, plain.loss, plain_grads)


def test_multimodal_loss_and_gradients_match_builtin():
    from conftest import IMAGE_PAD

    from transformers_qwen35.model.positions import token_types

    ours, native = build_vl_pair(seed=4, attn_implementation="eager", tie_word_embeddings=True)
    ours.loss_chunk_size = 3
    input_ids = torch.tensor([[5, 6, 7] + vision_run(4, IMAGE_PAD) + [8, 9, 10, 11, 12, 13, 14]])
    labels = input_ids.clone()
    labels[:, :9] = -100  # the prompt and the image: chunks 0..2 count for nothing
    grid = [[1, 4, 4]]
    vision = dict(pixel_values=random_pixels(grid, 1), image_grid_thw=torch.tensor(grid))
    chunked, chunked_grads = _step(ours, input_ids=input_ids, labels=labels, **vision)
    assert chunked.logits is None
    full, full_grads = _step(ours, input_ids=input_ids, labels=labels, skip_logits=False, **vision)
    types = token_types(input_ids, IMAGE_PAD, IMAGE_PAD + 1)
    builtin, builtin_grads = _step(native, input_ids=input_ids, labels=labels, mm_token_type_ids=types, **vision)
    _assert_same(chunked.loss, chunked_grads, full.loss, full_grads)
    assert relative_error(chunked.loss, builtin.loss) < LOSS_TOL
    checked = 0
    for name, grad in chunked_grads.items():
        reference = builtin_grads.get(name)
        if reference is None or reference.abs().max() == 0:
            continue
        assert relative_error(grad, reference) < GRAD_TOL, name
        checked += name.startswith("model.visual.")
    assert checked >= 10  # the vision tower's gradients were compared too


@pytest.mark.parametrize("on_head", [True, False])
def test_peft_adapters_on_the_head_and_the_layers_get_the_same_gradients(on_head, taken):
    """LoRA on lm_head wraps it (checkpointed path, the adapter runs per chunk); LoRA on the layers only leaves a
    frozen plain head (fused path, which then makes no weight gradient at all)."""
    peft = pytest.importorskip("peft")
    ours, _ = build_pair(tie_word_embeddings=False)
    ours.loss_chunk_size = CHUNK
    targets = ["q_proj", "down_proj"] + (["lm_head"] if on_head else [])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    config.init_lora_weights = False  # non-zero B, so every adapter matrix has a gradient
    model = peft.get_peft_model(ours, config)
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids))
    chunked, chunked_grads = _step(model, **inputs)
    _assert_took(taken, "checkpointed" if on_head else "fused")
    full, full_grads = _step(model, **inputs, skip_logits=False)
    assert chunked.logits is None and full.logits is not None
    assert any("lm_head.lora_A" in name for name in chunked_grads) == on_head
    assert all(".lora_" in name for name in chunked_grads)  # only the adapters train
    _assert_same(chunked.loss, chunked_grads, full.loss, full_grads)


def test_a_hooked_head_is_called_per_chunk_on_the_checkpointed_path(taken):
    """A forward hook that changes the logits (as a tensor-parallel or offloading hook changes what the head does):
    the chunked loss sees it, as the full-logits path does."""
    ours, _ = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    calls = []

    def hook(module, args, output):
        calls.append(torch.is_grad_enabled())
        return output * 1.5

    ours.lm_head.register_forward_hook(hook)
    ids = _ids()
    inputs = dict(input_ids=ids, labels=_labels(ids))
    chunked, chunked_grads = _step(ours, **inputs)
    _assert_took(taken, "checkpointed")
    assert len(calls) == 2 * 15  # 15 chunks, each called in forward and again in backward
    full, full_grads = _step(ours, **inputs, skip_logits=False)
    _assert_same(chunked.loss, chunked_grads, full.loss, full_grads)


def test_what_is_fusable():
    from torch.nn.modules import module as module_globals

    assert fusable(torch.nn.Linear(4, 6)) and fusable(torch.nn.Linear(4, 6, bias=False).to(torch.bfloat16))
    assert not fusable(type("MyLinear", (torch.nn.Linear,), {})(4, 6))  # a subclass may compute anything
    assert not fusable(torch.nn.Embedding(6, 4))
    replaced = torch.nn.Linear(4, 6)
    replaced.forward = lambda x: x  # as accelerate's add_hook_to_module does
    assert not fusable(replaced)
    for register in ("register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook"):
        hooked = torch.nn.Linear(4, 6)
        handle = getattr(hooked, register)(lambda *args: None)
        assert not fusable(hooked)
        handle.remove()
        assert fusable(hooked)
    handle = module_globals.register_module_forward_pre_hook(lambda *args: None)
    try:
        assert not fusable(torch.nn.Linear(4, 6))
    finally:
        handle.remove()
    assert not fusable(torch.nn.Linear(4, 6, device="meta"))  # offloaded: the weight arrives through a hook
    subclassed = torch.nn.Linear(4, 6)
    subclassed.weight = type("QuantisedParameter", (torch.nn.Parameter,), {})(subclassed.weight.detach())
    assert not fusable(subclassed)


def test_a_dtensor_weight_is_not_fusable():
    """FSDP2 / tensor-parallel parameters are DTensors between forwards (a one-rank fake process group here)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("fake", rank=0, world_size=1, store=FakeStore())
    try:
        head = torch.nn.Linear(4, 6)
        mesh = DeviceMesh("cpu", [0])
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Replicate()]))
        assert not fusable(head)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("path", PATHS)
def test_gradients_accumulate_over_two_backward_calls(path, taken):
    """Two micro-batches, each with its own backward, without zeroing in between (gradient accumulation): the sum
    of the two gradients, as built-in gives; and one graph backpropagated twice (retain_graph) gives twice its
    gradient."""
    ours, native = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    _use_path(ours.lm_head, path)
    batches = [_ids(seed=1), _ids(seed=2)]
    accumulated = {}
    for model in (ours, native):
        model.train()
        model.zero_grad(set_to_none=True)
        for ids in batches:
            model(input_ids=ids, labels=_labels(ids), num_items_in_batch=100).loss.backward()
        accumulated[model] = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    _assert_took(taken, path)
    for name, grad in accumulated[ours].items():
        assert relative_error(grad, accumulated[native][name]) < GRAD_TOL, name
    _, once = _step(ours, input_ids=batches[0], labels=_labels(batches[0]))
    loss = ours(input_ids=batches[0], labels=_labels(batches[0])).loss
    loss.backward(retain_graph=True)
    loss.backward()
    for name, p in ours.named_parameters():
        assert relative_error(p.grad, 2 * once[name]) < GRAD_TOL, name
    ours.zero_grad(set_to_none=True)


def test_trainer_trains_on_the_chunked_loss_and_evaluates_with_logits(tmp_path):
    from transformers import Trainer, TrainingArguments

    ours, _ = build_pair(tie_word_embeddings=True)
    ours.loss_chunk_size = CHUNK
    rows = [dict(input_ids=row, labels=row) for row in _ids(batch=4, length=16).tolist()]
    returned = []
    ours.register_forward_hook(lambda module, args, output: returned.append((module.training, output.logits)))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=ours, args=args, train_dataset=rows, eval_dataset=rows)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert [logits for training, logits in returned if training] == [None, None]
    predictions = trainer.predict(rows)
    assert predictions.predictions.shape == (4, 16, 99)
    assert predictions.metrics["test_loss"] > 0
    assert all(logits is not None for training, logits in returned if not training)


# --- memory -----------------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """The largest tensor (in elements) any op allocates while active: views of existing tensors do not count."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.largest = 0
        self.largest_fp32_vocab_rows = 0  # rows of the largest fp32 tensor whose last dimension is the vocabulary

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                if tensor.dtype == torch.float32 and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab_size:
                    self.largest_fp32_vocab_rows = max(self.largest_fp32_vocab_rows, tensor.numel() // self.vocab_size)
        return out


def _largest_allocations(model, ids, **kwargs) -> tuple[LargestAllocation, int]:
    """The allocation probe over forward + backward, and the rows of the largest tensor with a vocabulary-sized last
    dimension that autograd keeps for backward (outside a checkpoint, whose recomputation needs none)."""
    model.train()
    model.zero_grad(set_to_none=True)
    vocab, saved_rows = model.config.vocab_size, [0]

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == vocab:
            saved_rows[0] = max(saved_rows[0], tensor.numel() // vocab)
        return tensor

    with LargestAllocation(vocab) as probe:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return probe, saved_rows[0]


@pytest.mark.parametrize("path", PATHS)
def test_no_full_vocabulary_fp32_logits_are_ever_allocated(monkeypatch, path, taken):
    """Vocabulary 1000, 2 x 64 positions: full logits are 128,000 elements; every other tensor of the tiny model is
    at most ~33,000 (the 1000 x 32 embedding and its gradient, which the fused path accumulates in the forward).
    The default chunk size is bounded by CHUNK_ELEMENTS, lowered here to 16 rows' worth."""
    vocab = 1000
    ours, _ = build_pair(vocab_size=vocab, tie_word_embeddings=True)
    _use_path(ours.lm_head, path)
    ids = _ids(length=64, vocab=vocab)
    full_logits = ids.numel() * vocab

    materialised, saved_rows = _largest_allocations(ours, ids, skip_logits=False)
    assert materialised.largest >= full_logits  # the probes see the full logits when they exist
    assert materialised.largest_fp32_vocab_rows == saved_rows == ids.numel()

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 16 * vocab)
    chunked, saved_rows = _largest_allocations(ours, ids)
    assert chunked.largest_fp32_vocab_rows == 16  # one chunk's logits (and their gradient) at a time
    assert chunked.largest < full_logits / 3
    assert saved_rows == 0  # no chunk's logits are kept for backward (fused: its gradients are; checkpointed: rerun)
    _assert_took(taken, path)
