"""Kernel dispatch: chosen by the tensors' device, overridable, never tripped by an importable-but-unusable fla."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from conftest import build_pair, install_exact_fake_fla, install_fake_fla, relative_error
from transformers.models.qwen3_5 import modeling_qwen3_5

from transformers_qwen35.kernels import dispatch as kernels
from transformers_qwen35.kernels.reference.causal_conv import causal_conv1d
from transformers_qwen35.kernels.reference.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule


@pytest.fixture
def fake_fla(monkeypatch):
    """fla replaced by a fake on our exact ops that checks fla-core 0.6's signatures (conftest); yields the list of
    its calls, and forgets it afterwards (also when the test fails)."""
    yield install_exact_fake_fla(monkeypatch)
    kernels._load_fla.cache_clear()


def _gdn_inputs(batch=2, length=75, heads=2, v_heads=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=g)
    k = torch.randn(batch, length, heads, dim, generator=g)
    v = torch.randn(batch, length, v_heads, dim, generator=g)
    decay = -torch.rand(batch, length, v_heads, generator=g) * 2
    beta = torch.rand(batch, length, v_heads, generator=g)
    state = torch.randn(batch, v_heads, dim, dim, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("length", [1, 63, 75, 130])
@pytest.mark.parametrize("v_heads", [2, 4])
def test_chunked_and_recurrent_forms_match_builtin_reference(length, v_heads):
    q, k, v, g, beta, state = _gdn_inputs(length=length, v_heads=v_heads)
    chunk_out, chunk_state = chunk_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True)
    step_out, step_state = recurrent_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True)
    reference = inspect.unwrap(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
    # Key heads shared by groups of value heads, expanded as built-in's layer does (transformers < 5.2x's reference
    # takes only expanded heads; later ones expand themselves, and equally).
    group = v.shape[2] // q.shape[2]
    ref_out, ref_state = reference(
        q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2), v, g=g, beta=beta,
        initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    for out, final in ((chunk_out, chunk_state), (step_out, step_state)):
        assert relative_error(out, ref_out) < 1e-5
        assert relative_error(final, ref_state) < 1e-5


def test_packed_recurrence_and_conv_equal_segments_run_alone():
    q, k, v, g, beta, _ = _gdn_inputs(batch=1, length=90)
    bounds = [0, 30, 31, 90]
    cu = torch.tensor(bounds, dtype=torch.int32)
    packed, finals = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, cu_seqlens=cu)
    x = torch.randn(1, 90, 12)
    weight = torch.randn(12, 4)
    position = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    conv_packed, _ = causal_conv1d(x, weight, position_in_segment=position)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = slice(a, b)
        alone, final = recurrent_gated_delta_rule(
            q[:, piece], k[:, piece], v[:, piece], g[:, piece], beta[:, piece], output_final_state=True
        )
        assert relative_error(packed[:, piece], alone) < 1e-5
        assert relative_error(finals[n : n + 1], final) < 1e-5
        assert relative_error(conv_packed[:, piece], causal_conv1d(x[:, piece], weight)[0]) < 1e-6


def test_conv_with_cache_continues_exactly():
    x, weight = torch.randn(2, 20, 12), torch.randn(12, 4)
    full, _ = causal_conv1d(x, weight)
    first, state = causal_conv1d(x[:, :2], weight)  # shorter than the kernel: zero left context kept
    second, state = causal_conv1d(x[:, 2:13], weight, state)
    outs = [first, second]
    for t in range(13, 20):
        y, state = causal_conv1d(x[:, t : t + 1], weight, state)
        outs.append(y)
    assert relative_error(torch.cat(outs, 1), full) < 1e-6


def test_mode_knob(monkeypatch):
    tensor = torch.zeros(1)
    monkeypatch.setenv(kernels.KERNELS_ENV, "bogus")
    with pytest.raises(ValueError, match="TRANSFORMERS_QWEN35_KERNELS"):
        kernels.fla_kernels(tensor)
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    assert kernels.fla_kernels(tensor) is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    assert kernels.fla_kernels(tensor) is None  # CPU tensors never go to fla


def test_importable_but_broken_fla_never_runs_on_cpu(monkeypatch):
    """The triton-on-a-CPU-machine trap: fla imports, every kernel raises. Auto mode must not touch it."""

    def broken(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    install_fake_fla(
        monkeypatch, dict.fromkeys(["chunk", "recurrent", "conv", "conv_update", "norm", "rms_norm"], broken)
    )
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    ours, _ = build_pair(seed=4)
    ids = torch.randint(1, 99, (1, 9))
    assert ours.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 12)
    kernels._load_fla.cache_clear()


def test_forced_fla_path_passes_the_documented_arguments(monkeypatch, fake_fla):
    """With the fla path forced, a fake fla built on our exact ops checks every call's layout and arguments."""
    calls = fake_fla
    ours, _ = build_pair(seed=9, rms_norm_eps=1e-6)
    ids = torch.randint(1, 99, (1, 12))
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    with torch.no_grad():
        reference = ours(ids).logits
    reference_ids = ours.generate(ids, max_new_tokens=4, do_sample=False)
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    with torch.no_grad():
        assert relative_error(ours(ids).logits, reference) < 1e-5
    assert torch.equal(ours.generate(ids, max_new_tokens=4, do_sample=False), reference_ids)
    assert ("recurrent", 1, False) in calls and ("chunk", 12, False) in calls
    with torch.no_grad():
        ours(ids, position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None])
    assert ("chunk", 12, True) in calls and ("conv", 12, True) in calls
    assert any(call[0] == "rms_norm" for call in calls) and any(call[0] == "add_rms_norm" for call in calls)
    assert ("gates in kernel", 1, False) in calls and ("gates in kernel", 12, False) in calls
    assert ("swiglu", 12, False) in calls
    # The norms' weights get their gradients through the 1 + w handed to fla, A_log and dt_bias through the gates
    # fla makes in its kernels, the MLP's through fla's SwiGLU.
    gradients = {}
    for mode in ("torch", "fla"):
        monkeypatch.setenv(kernels.KERNELS_ENV, mode)
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=ids).loss.backward()
        gradients[mode] = {
            name: p.grad.clone()
            for name, p in ours.named_parameters()
            if "layernorm" in name or name.endswith(("A_log", "dt_bias")) or "mlp" in name
        }
    assert sum(name.endswith("A_log") for name in gradients["fla"]) == ours.config.layer_types.count("linear_attention")
    assert all(relative_error(gradients["fla"][name], grad) < 1e-5 for name, grad in gradients["torch"].items())


def test_forced_fla_without_fla_says_how_to_fix(monkeypatch):
    kernels._load_fla.cache_clear()
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)  # import fails
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    with pytest.raises(RuntimeError, match="pip install"):
        kernels.fla_kernels(torch.zeros(1))
    kernels._load_fla.cache_clear()


def test_training_under_bf16_autocast_on_the_pytorch_path(monkeypatch):
    """Trainer(bf16=True) trains under autocast: the recurrence keeps computing in fp32 (its triangular solves have
    no bf16 kernels), and loss and gradients stay as close to the fp32 step as built-in transformers' under the same
    autocast (bf16 rounding alone moves a tiny random model's gradients by ~15%)."""
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    ids = torch.randint(1, 99, (2, 40), generator=torch.Generator().manual_seed(0))
    distance = {}
    for name, model in zip(("ours", "built-in"), build_pair(seed=1)):
        model.train()
        results = {}
        for autocast in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            results[autocast] = loss.detach(), torch.cat([grads[n].reshape(-1) for n in sorted(grads)])
        (exact_loss, exact), (loss, grads) = results[False], results[True]
        assert abs(float(loss - exact_loss)) < 1e-2 * float(exact_loss), name
        distance[name] = float((grads - exact).norm() / exact.norm())
    assert distance["ours"] < 1.5 * distance["built-in"], distance


def test_a_failing_fused_norm_falls_back_to_the_pytorch_norm(monkeypatch, fake_fla):
    """fla's fused RMSNorm is one kernel among several paths: should it refuse an input, the PyTorch norm gives the
    same numbers (with one warning) and fla's norm is not tried again."""

    def refuses(*args, **kwargs):
        raise RuntimeError("unsupported input")

    monkeypatch.setattr(sys.modules["fla.modules.norm.layernorm"], "rms_norm", refuses)
    ours, _ = build_pair(seed=9, rms_norm_eps=1e-6)
    ids = torch.randint(1, 99, (1, 12))
    monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
    with torch.no_grad():
        reference = ours(ids).logits
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    with torch.no_grad():
        assert relative_error(ours(ids).logits, reference) < 1e-5
    assert kernels._load_fla().rms_norm is None


def test_norm_weights_are_prepared_together_without_autograd(monkeypatch, fake_fla):
    """On fla's norm without autograd, the 1 + w of every zero-centred RMSNorm is made once per forward (one
    concatenation, one add), and the norms read it: same logits as the PyTorch path, weights changed in place seen."""
    ours, _ = build_pair(seed=10, rms_norm_eps=1e-6)
    text = ours.model
    sizes = []
    original = kernels._ones
    monkeypatch.setattr(kernels, "_ones", lambda size, device: sizes.append(size) or original(size, device))
    ids = torch.randint(1, 99, (2, 7))
    with torch.no_grad():
        text.layers[1].post_attention_layernorm.weight.add_(0.25)  # seen by the next forward
        monkeypatch.setenv(kernels.KERNELS_ENV, "torch")
        reference = ours(ids).logits
        monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
        fused = ours(ids).logits
    norms = [module.weight for module in text.norm_modules()]
    assert len(norms) == 2 * len(text.layers) + 2 * text.config.layer_types.count("full_attention") + 1
    assert sizes == [sum(weight.numel() for weight in norms)]  # one preparation, no norm made its own
    assert relative_error(fused, reference) < 1e-5
    sizes.clear()
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    ours(ids, labels=ids).loss.backward()  # with autograd each norm makes its own, and w gets its gradient
    assert len(sizes) == len(norms) and norms[0].grad is not None
    # A hook on a norm may swap or move its weight at call time (offload, FSDP): then each norm makes its own too.
    sizes.clear()
    handle = text.layers[0].input_layernorm.register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad():
        assert relative_error(ours(ids).logits, fused) < 1e-6
    handle.remove()
    assert len(sizes) == len(norms)


def test_large_swiglu_without_autograd_is_made_in_place(monkeypatch, fake_fla):
    """fla's SwiGLU allocates its output: a large prefill makes the activation in place instead (same values)."""
    calls = fake_fla
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    gate, up = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    expected = torch.nn.functional.silu(gate) * up
    monkeypatch.setattr(kernels, "IN_PLACE_SWIGLU_ELEMENTS", 96)
    with torch.no_grad():
        assert torch.allclose(kernels.swiglu(gate.clone(), up), expected, atol=1e-6) and not calls  # 96: in place
        small = gate[:1, :5].clone()
        assert torch.allclose(kernels.swiglu(small, up[:1, :5]), expected[:1, :5], atol=1e-6)
    assert calls == [("swiglu", 5, False)]


@pytest.mark.parametrize("kernel_mode", ["torch", "fla"])
def test_deferred_residual_adds_give_the_same_logits(monkeypatch, fake_fla, kernel_mode):
    """Short inputs leave each layer's last residual add to the next layer's first norm: the same numbers as adding
    it in place (fp32), on the PyTorch path and on fla's fused norm (fake)."""
    from transformers_qwen35.model import modeling

    calls = fake_fla
    monkeypatch.setenv(kernels.KERNELS_ENV, kernel_mode)
    ours, _ = build_pair(seed=11, rms_norm_eps=1e-6)
    ids = torch.randint(1, 99, (2, 9))
    logits = {}
    for limit in (0, 10**6):
        monkeypatch.setattr(modeling, "DEFER_RESIDUAL_TOKENS", limit)
        calls.clear()
        with torch.no_grad():
            logits[limit] = ours(ids).logits
        fused_adds = sum(call[0] == "add_rms_norm" for call in calls)
        layers = len(ours.model.layers)
        assert fused_adds == (0 if kernel_mode == "torch" else layers + (layers if limit else 0)), fused_adds
    assert torch.allclose(logits[0], logits[10**6], rtol=0, atol=1e-6)


def test_fused_residual_norm_under_autocast_keeps_the_sums_dtype(monkeypatch, fake_fla):
    """Under autocast the residual stream stays fp32 while layer outputs are bf16: fla's fused add-and-norm then
    returns what the PyTorch path does (fp32 sum, fp32 norm), not the layer output's dtype."""
    ours, _ = build_pair(seed=12, rms_norm_eps=1e-6)
    ids = torch.randint(1, 99, (1, 6))
    hidden = {}
    for mode in ("torch", "fla"):
        monkeypatch.setenv(kernels.KERNELS_ENV, mode)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden[mode] = ours.model(ids).last_hidden_state
    assert hidden["fla"].dtype == hidden["torch"].dtype == torch.float32
    # bf16 rounding apart (the fake makes gates and SwiGLU in fp32, as fla does): 2.6e-2; a wrong sum is O(1)
    assert relative_error(hidden["fla"], hidden["torch"]) < 0.1


def test_small_ops_can_stay_on_pytorch_while_the_recurrence_runs_on_fla(monkeypatch, fake_fla):
    """TRANSFORMERS_QWEN35_FLA_SMALL_OPS=0: norms and SwiGLU on PyTorch ops, the Gated DeltaNet layers on fla."""
    calls = fake_fla
    ours, _ = build_pair(seed=13, rms_norm_eps=1e-6)
    ids = torch.randint(1, 99, (1, 10))
    monkeypatch.setenv(kernels.KERNELS_ENV, "fla")
    monkeypatch.setenv(kernels.SMALL_OPS_ENV, "0")
    with torch.no_grad():
        small_on_torch = ours(ids).logits
    kinds = {call[0] for call in calls}
    assert "chunk" in kinds and not kinds & {"rms_norm", "add_rms_norm", "swiglu"}
    monkeypatch.setenv(kernels.SMALL_OPS_ENV, "1")
    with torch.no_grad():
        assert relative_error(ours(ids).logits, small_on_torch) < 1e-5
    assert {"rms_norm", "swiglu"} <= {call[0] for call in calls}
