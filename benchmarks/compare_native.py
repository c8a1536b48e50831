#!/usr/bin/env python
"""Our Qwen3_5ForCausalLM against built-in transformers' on the same config and identical random weights.

Both models live in one process and take turns: a warm-up of each, then interleaved repeats (the order flips every
repeat), and the median is reported. Measurements:

* ``prefill``: one forward over B x T random tokens, no cache, ``logits_to_keep=1``, under ``no_grad``;
* ``decode``: greedy ``generate`` after a random prompt with ``min_new_tokens == max_new_tokens`` (both models do the
  same work). The time per step is (time for N new tokens - time for 1 new token) / (N - 1), so the prompt's prefill
  and per-call overheads cancel out (the method of kernels-and-traps.md §9);
* ``train``: forward with ``labels`` + backward + optimiser step + ``zero_grad(set_to_none=True)``.

Before any timing both models must give the same logits on a short input (relative error < 1e-3 in fp32, < 5e-2 in
bf16/fp16), else the script aborts. On CUDA the built-in model uses fla whenever fla imports (that is the baseline
users see); on CPU both run their PyTorch paths.

    python benchmarks/compare_native.py --device cpu --size tiny --quick
    python benchmarks/compare_native.py --device cuda --size 0.8B --json-out out/compare_0.8B.json

The last line printed is one JSON object with the speed ratios (ours / built-in, > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

SIZES = ("tiny", "small", "0.8B", "2B", "4B", "9B")
WHAT = ("prefill", "decode", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GDN_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)
OURS, BUILTIN = "ours", "built-in"

# Defaults per (device, quick). Shapes are "BxT". Decode: prompt length, new tokens N, batches.
PLANS = {
    ("cuda", False): dict(
        prefill="1x4096,1x16384,1x65536", decode_prompt=512, decode_new=65, decode_batch="1,8", train="1x4096",
        repeats=3, warmup=1, train_repeats=7, train_warmup=2,
    ),
    ("cuda", True): dict(
        prefill="1x4096,1x16384", decode_prompt=512, decode_new=33, decode_batch="1,8", train="1x4096",
        repeats=3, warmup=1, train_repeats=5, train_warmup=2,
    ),
    ("cpu", False): dict(
        prefill="1x2048,1x8192", decode_prompt=512, decode_new=65, decode_batch="1,8", train="1x2048",
        repeats=5, warmup=1, train_repeats=5, train_warmup=1,
    ),
    ("cpu", True): dict(
        prefill="1x512,1x1024", decode_prompt=32, decode_new=13, decode_batch="1,8", train="1x256",
        repeats=3, warmup=1, train_repeats=3, train_warmup=1,
    ),
}  # fmt: skip
# A training step on the GPU is short (~0.3 s) and its first steps still grow the allocator and the optimizer state
# (H100, three repeats after one warm-up: 341 / 367 / 259 ms): more of them cost little and steady the median.


# --- configs and models ---------------------------------------------------------------------------------------------


def text_config_dict(size: str) -> dict:
    """The official text config for 0.8B..9B; for ``tiny`` / ``small`` a reduced one of the same layout.

    ``tiny``: 4 layers (3 Gated DeltaNet, 1 full attention), hidden 512, full attention 4 x 256 (1 KV head),
    DeltaNet 4 key / 8 value heads of 128 (grouped value heads as in 4B/9B), vocab 32,000; ~35M parameters.
    ``small``: the reduced 0.8B-like model of kernels-and-traps.md §10 (8 layers, hidden 1024, vocab 32,000, 198.8M).
    """
    from transformers_qwen35.model.presets import ROPE, official_config_dict

    if size not in ("tiny", "small"):
        return official_config_dict(size)["text_config"]
    config = official_config_dict("0.8B")["text_config"]
    config.update(vocab_size=32000, eos_token_id=None, rope_parameters=dict(ROPE))
    if size == "tiny":
        config.update(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            linear_num_key_heads=4,
            linear_num_value_heads=8,
        )
    else:
        config.update(num_hidden_layers=8)
    config["layer_types"] = [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(config["num_hidden_layers"])
    ]
    return config


def relative_errors(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``rms``: ||ours - reference|| / ||reference|| (fla's convention; decides the guard). ``max``: max |ours -
    reference| / max |reference| (the tests' measure; one outlier logit dominates it)."""
    ours, reference = ours.detach().double(), reference.detach().double()
    difference = ours - reference
    return {
        "rms": float(difference.norm() / reference.norm().clamp_min(1e-30)),
        "max": float(difference.abs().max() / reference.abs().max().clamp_min(1e-30)),
    }


def _builtin_modules():
    from transformers.models.qwen3_5 import configuration_qwen3_5, modeling_qwen3_5

    return configuration_qwen3_5, modeling_qwen3_5


def builtin_kernel_paths() -> dict[str, str]:
    """Which implementation built-in transformers bound to each Gated DeltaNet function at its import: "torch", the
    kernel's ``module.name``, or "unknown" (a transformers whose dispatch wrapper this script does not recognise)."""
    _, modeling = _builtin_modules()
    paths = {}
    for name in GDN_FUNCTIONS:
        function = getattr(modeling, name, None)
        if function is None:
            continue
        paths[name] = "unknown"
        while function is not None:  # the fallback wrapper may sit under a hub-kernel wrapper
            try:
                closure = inspect.getclosurevars(function).nonlocals
            except (TypeError, ValueError):
                closure = {}
            if "implementation" in closure:
                chosen = closure["implementation"]
                if chosen is closure.get("torch_function") or not closure.get("is_new_implementation", True):
                    paths[name] = "torch"
                else:
                    paths[name] = f"{getattr(chosen, '__module__', '?')}.{getattr(chosen, '__name__', '?')}"
                break
            function = getattr(function, "__wrapped__", None)
    return paths


def builtin_uses_fla() -> bool:
    return any(path != "torch" for path in builtin_kernel_paths().values())


@contextlib.contextmanager
def builtin_on_torch_ops(enabled: bool = True):
    """Point built-in transformers' Gated DeltaNet at its PyTorch references for the duration (the fallback it uses
    when fla is absent). Needed on a CPU machine where triton imports (kernels-and-traps.md §8.1), and to measure its
    training on Hopper + Triton < 3.7.1, where fla refuses the backward (§8.2)."""
    if not enabled:
        yield
        return
    _, modeling = _builtin_modules()
    saved = {name: getattr(modeling, name) for name in GDN_FUNCTIONS if hasattr(modeling, name)}
    try:
        for name, function in saved.items():
            setattr(modeling, name, inspect.unwrap(function))
        yield
    finally:
        for name, function in saved.items():
            setattr(modeling, name, function)


def our_kernel_path(device: torch.device) -> str:
    from transformers_qwen35.kernels import dispatch as kernels
    from transformers_qwen35.kernels import hopper_backward

    mode = kernels.kernel_mode()
    if mode == "torch" or device.type != "cuda":
        return "torch"
    if kernels._load_fla() is None:
        return "torch (fla not importable)"
    version = hopper_backward.triton_version()
    if torch.cuda.get_device_capability(device)[0] == 9 and version and (3, 4, 0) <= version < (3, 7, 1):
        if kernels._load_fla().hopper_backward:
            return "fla (training: with our replacement for the backward piece fla refuses here, fla issue #640)"
        return "fla (training: torch, Hopper + Triton < 3.7.1, fla issue #640)"
    return "fla"


def build_ours(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa",
               vocab: int | None = None):  # fmt: skip
    """Our model with random weights, eval mode, on ``device`` in ``dtype``; ``vocab`` replaces the config's
    vocabulary size. ``A_log`` and ``linear_attn.norm.weight`` are drawn in ``dtype`` and then widened to fp32 by
    ``_from_config`` (as ``from_pretrained`` keeps them), exactly."""
    import transformers_qwen35

    config = text_config_dict(size)
    if vocab:
        config["vocab_size"] = vocab
    torch.manual_seed(seed)
    with torch.device(device):
        ours = transformers_qwen35.Qwen3_5ForCausalLM._from_config(
            transformers_qwen35.Qwen3_5TextConfig(**config), dtype=dtype, attn_implementation=attn
        )
    if any(p.device.type != device.type for p in ours.parameters()):
        ours.to(device)
    return ours.eval()


def build_models(size: str, device: torch.device, dtype: torch.dtype, seed: int, attn: str, vocab: int | None = None):
    """(ours, built-in), eval mode, on ``device`` in ``dtype``, with identical weights (``build_ours``'s, loaded into
    built-in transformers, which casts the fp32 ones to ``dtype``)."""
    configuration, modeling = _builtin_modules()
    ours = build_ours(size, device, dtype, seed, attn, vocab)
    config = dict(text_config_dict(size), **({"vocab_size": vocab} if vocab else {}))
    with torch.device(device):
        builtin = modeling.Qwen3_5ForCausalLM._from_config(
            configuration.Qwen3_5TextConfig(**config), dtype=dtype, attn_implementation=attn
        )
    if any(p.device.type != device.type for p in builtin.parameters()):
        builtin.to(device)
    builtin.load_state_dict(ours.state_dict())
    return ours, builtin.eval()


def correctness_guard(ours, builtin, device, dtype, vocab: int, tolerance: float | None) -> dict[str, float]:
    """Abort unless both models give the same logits on a short input.

    fp32: relative RMS error below 1e-3 (or ``tolerance``). bf16/fp16: random models drift apart layer by layer
    through rounding alone (4.9e-2 relative on the 0.8B shape on the H100, 2e-2 on CPU), so a fixed bar is either
    loose or fragile. Both are measured against our model in fp32 on its exact PyTorch path instead: ours must be no
    further from it than built-in is, give or take rounding (twice built-in's distance, plus 1e-2), and the two
    within 0.2 of each other (or ``tolerance``); a wrong weight or kernel is O(1) off."""
    ids = torch.randint(1, vocab, (2, 48), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        ours_logits, builtin_logits = ours(ids).logits.float(), builtin(ids).logits.float()
    errors = relative_errors(ours_logits, builtin_logits)
    reasons = []
    if dtype == torch.float32:
        bar = 1e-3 if tolerance is None else tolerance
        if not errors["rms"] < bar:
            reasons.append(f"relative RMS error {errors['rms']:.3e} >= {bar:g}")
    else:
        with torch.no_grad(), _in_fp32(ours), _kernels("torch"):
            exact = ours(ids).logits.float()
        errors["ours_vs_fp32"] = relative_errors(ours_logits, exact)["rms"]
        errors["builtin_vs_fp32"] = relative_errors(builtin_logits, exact)["rms"]
        bar = 0.2 if tolerance is None else tolerance
        if not errors["rms"] < bar:
            reasons.append(f"relative RMS error {errors['rms']:.3e} >= {bar:g}")
        if not errors["ours_vs_fp32"] <= 2 * errors["builtin_vs_fp32"] + 1e-2:
            reasons.append(
                f"ours is {errors['ours_vs_fp32']:.3e} from the fp32 logits, built-in {errors['builtin_vs_fp32']:.3e}"
            )
    if reasons:
        raise SystemExit(
            f"ABORT: logits differ between ours and built-in ({'; '.join(reasons)}; relative max error "
            f"{errors['max']:.3e}); timings of models that disagree mean nothing. If this is rounding on a deep random "
            "model rather than a bug, --guard-tolerance raises the bar."
        )
    return errors


@contextlib.contextmanager
def _in_fp32(model):
    """``model``'s half-precision parameters and buffers widened to fp32 in place, and narrowed back (exactly)."""
    narrowed = [
        (t, t.dtype) for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)
    ]
    for tensor, _ in narrowed:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, original in narrowed:
            tensor.data = tensor.data.to(original)


@contextlib.contextmanager
def _env(name: str, value: str):
    """The environment variable ``name`` set to ``value`` for the block (our kernel choices are read per call)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _kernels(mode: str):
    """Our model's kernel choice (``TRANSFORMERS_QWEN35_KERNELS``) for the block."""
    from transformers_qwen35.kernels import dispatch as kernels

    return _env(kernels.KERNELS_ENV, mode)


# --- timing and memory ----------------------------------------------------------------------------------------------


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _page_size()
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class RssPeak:
    """Peak process RSS above the RSS at entry, sampled every ``interval`` s in a thread (CPU only; approximate:
    allocations shorter than the interval can be missed, and freed memory kept by the allocator is not counted)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        _malloc_trim()
        self.start = current_rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _malloc_trim():
    """Give freed heap memory back to the OS (glibc), so an RSS delta is not hidden by memory from earlier runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Timer:
    """Wall time of a block (CUDA synchronised) and its peak memory above what was in use at entry."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._rss = RssPeak().__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
            self.peak = self.peak_total - self._base
        else:
            self._rss.__exit__(exc_type, *exc)
            self.peak = self._rss.delta
            self.peak_total = self._rss.peak


@dataclass
class Result:
    what: str  # prefill / decode / train
    shape: str  # e.g. "1x4096" or "b8 p512 n129"
    model: str
    tokens: int  # tokens per timed step
    ms: float | None = None  # per step (decode: per generated token step)
    tokens_per_s: float | None = None
    peak_bytes: int | None = None  # above what was in use before the step
    peak_total_bytes: int | None = None  # CUDA: max_memory_allocated; CPU: peak RSS of the process
    times_s: list = field(default_factory=list)
    note: str = ""
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.what}_{self.shape.replace(' ', '_')}"


def _short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def interleaved(runs: dict, repeats: int, warmup: int, device, cold: tuple = ()) -> dict:
    """runs: label -> zero-argument callable; labels in ``cold`` get no warm-up of their own (another run warms the
    same code). Returns label -> (list of seconds, max peak bytes above the start, max peak total), or the exception
    that stopped that label."""
    results = {label: ([], 0, 0) for label in runs}
    failed: dict[str, BaseException] = {}
    for label, run in runs.items():
        for _ in range(0 if label in cold else warmup):
            try:
                run()
            except Exception as error:  # measured as a failure, the other model goes on
                failed[label] = error
                break
        _free(device)
    labels = [label for label in runs if label not in failed]
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            if label in failed:
                continue
            try:
                with Timer(device) as timer:
                    runs[label]()
            except Exception as error:
                failed[label] = error
                _free(device)
                continue
            times, peak, total = results[label]
            times.append(timer.seconds)
            results[label] = (times, max(peak, timer.peak), max(total, timer.peak_total))
    return {label: failed.get(label, results[label]) for label in runs}


# --- measurements ---------------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        batch, _, length = item.lower().partition("x")
        shapes.append((int(batch), int(length)) if length else (1, int(batch)))
    return shapes


def random_ids(batch, length, vocab, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator).to(device)


def bench_prefill(models, shapes, vocab, device, args) -> list[Result]:
    from transformers_qwen35.kernels import dispatch as kernels

    out = []
    for batch, length in shapes:
        ids = random_ids(batch, length, vocab, device, seed=length)

        def runner(model, ids):
            def run():
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)

            return run

        runs = {label: runner(model, ids) for label, model in models.items()}
        if device.type == "cuda":
            runs[TORCH_SMALL_OPS] = under_env(runner(models[OURS], ids), kernels.SMALL_OPS_ENV, "0")
        measured = interleaved(runs, args.repeats, args.warmup, device)
        for label, value in measured.items():
            out.append(_result("prefill", f"{batch}x{length}", label, batch * length, value))
        runs = ids = None
        _free(device)
    return out


# Our other decoding loop, beside plain generate(): on a GPU plain generate() already decodes on the static cache with
# CUDA graphs, so the other row is transformers' loop on our growing cache (cache_implementation="dynamic"); on a CPU
# plain generate() is that loop and the other row is cache_implementation="static".
OTHER_CACHE = {"cuda": "dynamic", "cpu": "static"}


def cache_label(implementation: str) -> str:
    return f"{OURS} {implementation}"


# Prefill and training on CUDA also run ours with its norms and SwiGLU on PyTorch ops
# (TRANSFORMERS_QWEN35_FLA_SMALL_OPS=0): a step that waits on the host may be faster with fewer fla calls.
TORCH_SMALL_OPS = f"{OURS} torch-small-ops"
# Training on CUDA also runs ours with its decoder's forward and backward replayed from CUDA graphs
# (TRANSFORMERS_QWEN35_TRAINING_GRAPHS=1, opt-in; captured on the second call, then replayed): a 4k-token step of
# 0.8B otherwise waits on kernel launches.
TRAINING_GRAPHS = f"{OURS} graphed"


def under_env(run, name: str, value: str):
    """``run`` with the environment variable ``name`` set to ``value`` while it runs (our switches are read per
    call)."""

    def wrapped():
        with _env(name, value):
            run()

    return wrapped


# --decode-sampling: both models also decode with the official checkpoints' generation config (sampling through
# transformers' temperature, top-k and top-p warpers: a sort of the whole vocabulary per step), ratio between those.
SAMPLING = dict(do_sample=True, temperature=1.0, top_k=20, top_p=0.95)
SAMPLING_LABELS = {OURS: f"{OURS} sampling", BUILTIN: f"{BUILTIN} sampling"}
OTHER_LABELS = (
    *(cache_label(implementation) for implementation in OTHER_CACHE.values()),
    TORCH_SMALL_OPS,
    TRAINING_GRAPHS,
)


def mtp_label(draft_tokens: int, oracle: bool = False) -> str:
    return f"{OURS} mtp K={draft_tokens}" + (" oracle" if oracle else "")


def bench_decode(models, batches, prompt, new, vocab, device, args) -> tuple[list[Result], dict, dict]:
    """Plain greedy decoding of both models, then ours with MTP drafts (``--mtp``): with the model's own head (random
    weights accept almost nothing, so this row is the cost of rejected drafts) and, with ``--mtp-oracle``, with
    drafts that are always right (the tokens plain decoding produced: the ceiling at full acceptance)."""
    out, same_tokens, mtp_stats = [], {}, {}
    variants = {label: (model, {}) for label, model in models.items()}
    if args.static:
        other = OTHER_CACHE[device.type]
        variants[cache_label(other)] = (models[OURS], dict(cache_implementation=other))
    if args.decode_sampling:
        for label, model in models.items():
            variants[SAMPLING_LABELS[label]] = (model, SAMPLING)
    for draft_tokens in args.mtp:
        # MTP rows verify drafts on the static cache where asked (the default on a GPU).
        mtp = (
            dict(cache_implementation="static", mtp_draft_tokens=draft_tokens)
            if args.static
            else dict(mtp_draft_tokens=draft_tokens)
        )
        variants[mtp_label(draft_tokens)] = (models[OURS], mtp)
        if args.mtp_oracle:
            variants[mtp_label(draft_tokens, True)] = (models[OURS], dict(mtp, oracle=True))
    for batch in batches:
        ids = random_ids(batch, prompt, vocab, device, seed=prompt + batch)
        generated, stats = {}, {}

        def runner(model, label, count, ids, generated, stats, extra):
            mask = torch.ones_like(ids)
            extra = dict(extra)
            oracle = extra.pop("oracle", False)

            settings = dict(do_sample=False, num_beams=1, pad_token_id=0)
            settings.update(extra)

            def run():
                drafts = oracle_drafts(generated[OURS], prompt) if oracle else contextlib.nullcontext()
                with torch.no_grad(), drafts:
                    tokens = model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, **settings
                    )
                if count == new:
                    generated[label] = tokens
                    if "mtp_draft_tokens" in extra:
                        stats[label] = model.mtp_stats

            return run

        runs = {}
        for label, (model, extra) in variants.items():
            runs[(label, 1)] = runner(model, label, 1, ids, generated, stats, extra)
            runs[(label, new)] = runner(model, label, new, ids, generated, stats, extra)
        # The warm-up of the long call also warms the short one (same prefill and step code).
        measured = interleaved(runs, args.repeats, args.warmup, device, cold=tuple((label, 1) for label in variants))
        shape = f"b{batch} p{prompt} n{new}"
        for label in variants:
            short, long = measured[(label, 1)], measured[(label, new)]
            result = Result("decode", shape, label, batch)
            if isinstance(short, BaseException) or isinstance(long, BaseException):
                result.error = _short_error(short if isinstance(short, BaseException) else long)
            else:
                step = (statistics.median(long[0]) - statistics.median(short[0])) / (new - 1)
                result.ms = step * 1e3
                result.tokens_per_s = batch / step if step > 0 else None
                result.peak_bytes, result.peak_total_bytes = long[1], long[2]
                result.times_s = [round(t, 5) for t in long[0]]
                result.note = f"generate {new} new: {statistics.median(long[0]) * 1e3:.0f} ms"
                if label in stats:
                    run_stats = stats[label]
                    result.note += (
                        f", acceptance {run_stats.acceptance_rate:.2f}, {run_stats.tokens_per_pass:.2f} tokens/pass"
                    )
                    mtp_stats.setdefault(shape, {})[label] = {
                        "acceptance_rate": round(run_stats.acceptance_rate, 3),
                        "tokens_per_pass": round(run_stats.tokens_per_pass, 3),
                    }
            out.append(result)
        if OURS in generated and BUILTIN in generated:
            same_tokens[shape] = bool(torch.equal(generated[OURS], generated[BUILTIN]))
        for label in [*stats, *(label for label in OTHER_LABELS if label in generated)]:
            # greedy MTP decoding and our other loop must give plain decoding's tokens
            same_tokens[f"{shape} {label}"] = bool(torch.equal(generated[label], generated[OURS]))
        runs = ids = generated = None
        _free(device)
    return out, same_tokens, mtp_stats


@contextlib.contextmanager
def oracle_drafts(reference: torch.Tensor, prompt_length: int):
    """MTP drafts replaced by the tokens plain decoding produced (``reference``): every draft is accepted."""
    from transformers_qwen35.generation import speculative

    original = speculative._Run.draft

    def draft(run, k):
        done = run.count[:, None] + torch.arange(k, device=run.device)[None, :]
        index = (prompt_length + done).clamp(max=reference.shape[1] - 1)
        drafts = reference.gather(1, index.to(reference.device)).to(run.device)
        return drafts, torch.zeros(*drafts.shape, 1, device=run.device)  # greedy: the scores are not read

    speculative._Run.draft = draft
    try:
        yield
    finally:
        speculative._Run.draft = original


def attach_random_mtp_heads(model, seed: int) -> None:
    """Models built from a config have no MTP head: give ours a random one of the official shape (drafts from
    random weights are almost never accepted)."""
    from transformers_qwen35.model.mtp import Qwen3_5MultiTokenPredictor, set_mtp_head

    parameter = next(model.parameters())
    torch.manual_seed(seed)
    with torch.device(parameter.device):
        head = Qwen3_5MultiTokenPredictor(model.config)
    set_mtp_head(model, head.to(parameter.dtype))


def bench_train(models, shape, vocab, device, args) -> list[Result]:
    from transformers_qwen35.kernels import dispatch as kernels
    from transformers_qwen35.training import graphs as training_graphs

    batch, length = shape
    ids = random_ids(batch, length, vocab, device, seed=length + 1)
    optimizers = {}

    def runner(label, model, ids):
        def run():
            if label not in optimizers:
                model.train()
                optimizers[label] = make_optimizer(model, args.optimizer)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if optimizers[label] is not None:
                optimizers[label].step()
            model.zero_grad(set_to_none=True)

        return run

    runs = {label: runner(label, model, ids) for label, model in models.items()}
    notes = {}
    if device.type == "cuda":
        runs[TORCH_SMALL_OPS] = under_env(runner(TORCH_SMALL_OPS, models[OURS], ids), kernels.SMALL_OPS_ENV, "0")
        graphed = runner(TRAINING_GRAPHS, models[OURS], ids)
        runs[TRAINING_GRAPHS] = under_env(graphed, training_graphs.TRAINING_GRAPHS_ENV, "1")
        try:
            notes[TRAINING_GRAPHS] = graphed_training_check(models[OURS], ids)
        except Exception as error:  # reported in the row's note; the timing still runs
            notes[TRAINING_GRAPHS] = f"check failed: {_short_error(error)}"
        _free(device)
    repeats = args.train_repeats, args.train_warmup
    measured = interleaved(runs, *repeats, device)
    if TRAINING_GRAPHS in runs:
        notes[TRAINING_GRAPHS] += "; " + graph_memory_note(models[OURS], device)
    failed = measured.get(BUILTIN)
    if isinstance(failed, BaseException) and device.type == "cuda" and builtin_uses_fla():
        # Hopper + Triton < 3.7.1: fla refuses its backward (#640). Measure built-in on its PyTorch fallback instead.
        models[BUILTIN].zero_grad(set_to_none=True)
        optimizers.pop(BUILTIN, None)
        _free(device)
        with builtin_on_torch_ops():
            retry = interleaved({BUILTIN: runner(BUILTIN, models[BUILTIN], ids)}, *repeats, device)
        if not isinstance(retry[BUILTIN], BaseException):
            notes[BUILTIN] = f"torch fallback; with fla: {_short_error(failed)}"
        measured[BUILTIN] = retry[BUILTIN]
    failed = measured.get(OURS)
    if isinstance(failed, BaseException) and device.type == "cuda":
        # Ours must train on any stack: if its fla path failed, say so and measure its PyTorch ops.
        models[OURS].zero_grad(set_to_none=True)
        optimizers.pop(OURS, None)
        _free(device)
        with _kernels("torch"):
            retry = interleaved({OURS: runner(OURS, models[OURS], ids)}, *repeats, device)
        if not isinstance(retry[OURS], BaseException):
            notes[OURS] = f"torch ops; with fla: {_short_error(failed)}"
        measured[OURS] = retry[OURS]
    out = [
        _result("train", f"{batch}x{length}", label, batch * length, value, notes.get(label, ""))
        for label, value in measured.items()
    ]
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.eval()
    optimizers.clear()
    runs = ids = None
    _free(device)
    return out


def graphed_training_check(model, ids) -> str:
    """The graphed step's loss and gradients against an eager step's on the same batch and weights (the third graphed
    call is the first replay: seen, captured, replayed), as relative RMS differences."""
    from transformers_qwen35.training import graphs as training_graphs

    def step(graphed: str):
        with _env(training_graphs.TRAINING_GRAPHS_ENV, graphed):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return loss.detach().float(), [p.grad.detach().float() for p in model.parameters() if p.grad is not None]

    model.train()
    try:
        eager_loss, eager = step("0")
        eager = [g.clone() for g in eager]
        for _ in range(3):
            graphed_loss, graphed = step("1")
        state = training_graphs._STATES.get(model.model)
        replayed = bool(state and state.graphs and next(iter(state.graphs.values())).replays)
        difference = sum(float((a - b).square().sum()) for a, b in zip(graphed, eager))
        norm = sum(float(b.square().sum()) for b in eager)
        loss_error = abs(float(graphed_loss - eager_loss)) / abs(float(eager_loss))
        return (
            f"check vs eager step: {'replayed' if replayed else 'NOT replayed'}, loss {loss_error:.1e}, gradients "
            f"{(difference / norm) ** 0.5:.1e} relative RMS"
        )
    finally:
        model.zero_grad(set_to_none=True)
        training_graphs.release_training_graphs(model)
        model.eval()


def graph_memory_note(model, device) -> str:
    """What the training graphs hold between steps (activations and gradient buffers, outside the peak above, which
    counts from what was allocated before the step), measured by releasing them."""
    from transformers_qwen35.training import graphs as training_graphs

    state = training_graphs._STATES.get(model.model)
    captures = state.captures if state is not None else 0
    # A failed capture (or too many) turns the graphs off with a warning: the row then timed eager steps.
    disabled = "; GRAPHS TURNED OFF, eager steps timed (see the warning above)" if state and state.disabled else ""
    before = torch.cuda.memory_allocated(device)
    training_graphs.release_training_graphs(model)
    _free(device)
    held = before - torch.cuda.memory_allocated(device)
    return f"{captures} capture(s); the graphs held {held / 2**30:.2f} GiB between steps{disabled}"


def make_optimizer(model, name):
    if name == "none":
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-6)
    return torch.optim.AdamW(params, lr=1e-6)


def _result(what, shape, label, tokens, value, note="") -> Result:
    result = Result(what, shape, label, tokens, note=note)
    if isinstance(value, BaseException):
        result.error = _short_error(value)
        return result
    times, result.peak_bytes, result.peak_total_bytes = value
    seconds = statistics.median(times)
    result.ms = seconds * 1e3
    result.tokens_per_s = tokens / seconds
    result.times_s = [round(t, 5) for t in times]
    return result


# --- report ---------------------------------------------------------------------------------------------------------


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dist in (
        ("transformers", "transformers"),
        ("fla", "fla-core"),
        ("triton", "triton"),
        ("transformers_qwen35", "transformers-qwen35"),
    ):
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found["fla"] is None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found["fla"] = importlib.metadata.version("flash-linear-attention")
    if found["transformers_qwen35"] is None:  # importable from src/ without being installed
        with contextlib.suppress(Exception):
            found["transformers_qwen35"] = importlib.import_module("transformers_qwen35").__version__
    if found["triton"] is None:
        with contextlib.suppress(Exception):
            found["triton"] = importlib.import_module("triton").__version__
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:.3f} GiB"


def _num(value, digits=1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratios(results: list[Result]) -> tuple[dict, dict]:
    """Speed ratio (ours tokens/s / built-in tokens/s) and peak-memory ratio (ours / built-in) per measurement; MTP
    rows add ``<key>_mtpK`` (and ``..._oracle``) entries, also relative to built-in."""
    by_key: dict[str, dict[str, Result]] = {}
    for result in results:
        by_key.setdefault(result.key, {})[result.model] = result
    speed, memory = {}, {}
    for key, pair in by_key.items():
        builtin = pair.get(BUILTIN)
        for label, result in pair.items():
            if label.startswith(f"{OURS} mtp") and builtin and result.tokens_per_s and builtin.tokens_per_s:
                suffix = label.split("K=")[1].replace(" ", "_")
                speed[f"{key}_mtp{suffix}"] = round(result.tokens_per_s / builtin.tokens_per_s, 3)
            if label in OTHER_LABELS and builtin and result.tokens_per_s and builtin.tokens_per_s:
                speed[f"{key}_{label.split()[-1]}"] = round(result.tokens_per_s / builtin.tokens_per_s, 3)
        sampled, builtin_sampled = pair.get(SAMPLING_LABELS[OURS]), pair.get(SAMPLING_LABELS[BUILTIN])
        if sampled and builtin_sampled and sampled.tokens_per_s and builtin_sampled.tokens_per_s:
            speed[f"{key}_sampling"] = round(sampled.tokens_per_s / builtin_sampled.tokens_per_s, 3)
        ours, builtin = pair.get(OURS), pair.get(BUILTIN)
        if ours and builtin and ours.tokens_per_s and builtin.tokens_per_s:
            speed[key] = round(ours.tokens_per_s / builtin.tokens_per_s, 3)
        else:
            speed[key] = None
        if ours and builtin and ours.peak_bytes and builtin.peak_bytes:
            memory[key] = round(ours.peak_bytes / builtin.peak_bytes, 3)
        else:
            memory[key] = None
    return speed, memory


def print_table(results: list[Result], speed: dict, memory: dict, memory_label: str):
    print(f"| measurement | model | tokens/s | ms/step | {memory_label} | speed ours/built-in | memory ours/built-in |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for result in results:
        is_ours = result.model == OURS
        ratio = _num(speed.get(result.key), 2) + "×" if is_ours and speed.get(result.key) else ""
        if result.model.startswith(f"{OURS} mtp"):
            mtp_key = f"{result.key}_mtp{result.model.split('K=')[1].replace(' ', '_')}"
            ratio = _num(speed.get(mtp_key), 2) + "×" if speed.get(mtp_key) else ""
        if result.model in OTHER_LABELS or result.model == SAMPLING_LABELS[OURS]:
            other_key = f"{result.key}_{result.model.split()[-1]}"
            ratio = _num(speed.get(other_key), 2) + "×" if speed.get(other_key) else ""
        mem_ratio = _num(memory.get(result.key), 2) + "×" if is_ours and memory.get(result.key) else ""
        if result.error:
            row = f"FAILED: {result.error}", "—", "—"
        else:
            row = _num(result.tokens_per_s), _num(result.ms, 2), _gib(result.peak_bytes)
        show_note = result.note and (result.what != "decode" or "acceptance" in result.note)
        label = result.model + (f" ({result.note.split(', ', 1)[-1]})" if show_note else "")
        print(f"| {result.what} {result.shape} | {label} | {row[0]} | {row[1]} | {row[2]} | {ratio} | {mem_ratio} |")


# --- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument(
        "--what",
        default="prefill,decode,train",
        help="comma-separated subset of " + ",".join(WHAT) + ", run in this order",
    )
    parser.add_argument("--quick", action="store_true", help="shorter sequences and fewer tokens")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores available)")
    parser.add_argument("--prefill", help="prefill shapes BxT, comma-separated (e.g. 1x4096,1x16384)")
    parser.add_argument("--decode-prompt", type=int, help="decode prompt length")
    parser.add_argument("--decode-new", type=int, help="new tokens N per generate (>= 2)")
    parser.add_argument("--decode-batch", help="decode batch sizes, comma-separated (e.g. 1,8)")
    parser.add_argument("--train", help="training shape BxT (e.g. 1x4096)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "none"), default="adamw")
    parser.add_argument(
        "--loss-chunk-size",
        type=int,
        help="rows per chunk of our training loss (model.loss_chunk_size; default: as many as keep a chunk's fp32 "
        "logits within 256 MiB, 270 rows at the official vocabulary)",
    )
    parser.add_argument("--repeats", type=int, help="timed runs per model and measurement (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed runs per model before the timed ones")
    parser.add_argument("--train-repeats", type=int, help="timed training steps per model (median reported)")
    parser.add_argument("--train-warmup", type=int, help="untimed training steps per model before the timed ones")
    parser.add_argument("--attn", default="sdpa", help="attention implementation for both models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, help="vocabulary size replacing the config's (e.g. 248320, --size tiny)")
    parser.add_argument(
        "--mtp",
        help="MTP draft counts K to decode with as well, comma-separated (default: 1,2,3 on CUDA, 2 on CPU; 0: none)",
    )
    parser.add_argument(
        "--mtp-oracle",
        action="store_true",
        help="also decode with always-right drafts (the ceiling at full acceptance)",
    )
    parser.add_argument(
        "--decode-sampling",
        action="store_true",
        help="both models also decode with the official generation config (temperature 1.0, top-k 20, top-p 0.95)",
    )
    parser.add_argument(
        "--static",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also decode with our other loop (on CUDA cache_implementation='dynamic', as plain generate() there "
        "already decodes on the static cache with CUDA graphs; on CPU cache_implementation='static') and verify MTP "
        "drafts on the static cache (default: on for CUDA, off for CPU)",
    )
    parser.add_argument(
        "--guard-tolerance",
        type=float,
        help="relative RMS logits error between the two models that aborts (default 1e-3 fp32, 0.2 bf16/fp16, where "
        "ours must also be no further from the fp32 logits than twice built-in's distance plus 1e-2)",
    )
    parser.add_argument("--json-out", help="write the full results (every run) to this file")
    args = parser.parse_args(argv)
    plan = PLANS[(args.device, args.quick)]
    for name, value in plan.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.what = list(dict.fromkeys(w.strip() for w in args.what.split(",") if w.strip()))
    unknown = set(args.what) - set(WHAT)
    if unknown:
        parser.error(f"--what: unknown {sorted(unknown)}; choose from {', '.join(WHAT)}")
    if args.decode_new < 2:
        parser.error("--decode-new must be at least 2 (the step time is a difference of two generate calls)")
    if args.mtp is None:
        args.mtp = "1,2,3" if args.device == "cuda" else "2"
    if args.static is None:
        args.static = args.device == "cuda"
    try:
        args.mtp = [int(k) for k in args.mtp.split(",") if k.strip() and int(k) > 0]
    except ValueError:
        parser.error(f"--mtp: expected comma-separated draft counts such as 1,2,3, got {args.mtp!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fallback notices are reported below, once, in the header
    import transformers_qwen35  # noqa: F401  (registers the package; keeps its kernel choice per call)

    # Built-in transformers binds fla at import whenever fla imports; on a CPU that crashes (§8.1): use its torch ops.
    cpu_guard = device.type == "cpu" and builtin_uses_fla()
    with builtin_on_torch_ops(cpu_guard):
        return _run(args, device, dtype, threads, started)


def _run(args, device, dtype, threads, started) -> dict:
    ours, builtin = build_models(args.size, device, dtype, args.seed, args.attn, args.vocab)
    models = {OURS: ours, BUILTIN: builtin}
    if args.loss_chunk_size:
        ours.loss_chunk_size = args.loss_chunk_size
    vocab = min(ours.config.vocab_size, 32000)
    parameters = sum(p.numel() for p in ours.parameters())
    errors = correctness_guard(ours, builtin, device, dtype, vocab, args.guard_tolerance)
    info = {
        "device": device.type,
        "device_name": device_name(device),
        "size": args.size,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "parameters": parameters,
        "layers": ours.config.num_hidden_layers,
        "hidden": ours.config.hidden_size,
        "vocab": ours.config.vocab_size,
        "attn": args.attn,
        "optimizer": args.optimizer,
        "loss_chunk_size": args.loss_chunk_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "train_repeats": args.train_repeats,
        "train_warmup": args.train_warmup,
        "quick": args.quick,
        "versions": versions(),
        "kernels": {OURS: our_kernel_path(device), BUILTIN: builtin_kernel_paths()},
        "logits_relative_error": {name: float(f"{value:.3e}") for name, value in errors.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # On a shared machine other work steals cores: a load above the thread count makes timings noisy.
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    memory_label = "peak mem Δ (CUDA allocated)" if device.type == "cuda" else "peak RSS Δ (sampled)"
    print(f"# compare_native: {args.size} ({parameters / 1e6:.1f}M parameters), {info['dtype']}, {device.type}")
    for key in ("device_name", "threads", "versions", "kernels", "logits_relative_error"):
        print(f"#   {key}: {info[key]}")
    sys.stdout.flush()

    results: list[Result] = []
    extra: dict = {"phase_seconds": {"setup": round(time.perf_counter() - started, 1)}}

    def report(final: bool) -> dict:
        speed, memory = ratios(results)
        summary = {"benchmark": "compare_native", **info, "ratios": speed, "memory_ratios": memory, **extra}
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["complete"] = final
        if "loadavg_start" in info:
            summary["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        summary["memory"] = (
            "torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
            if device.type == "cuda"
            else "peak process RSS during the step minus RSS before it, sampled every 2 ms from /proc/self/statm"
        )
        if args.json_out:  # rewritten after every phase, so a run cut short still leaves its results
            os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
            with open(args.json_out, "w") as handle:
                json.dump({**summary, "results": [vars(r) | {"key": r.key} for r in results]}, handle, indent=1)
        return summary

    def phase(name, measure):
        clock = time.perf_counter()
        new = measure()
        extra["phase_seconds"][name] = round(time.perf_counter() - clock, 1)
        for result in new:  # progress, in case the run is cut short before the table
            shown = result.error or f"{_num(result.tokens_per_s)} tok/s, {_num(result.ms, 2)} ms/step"
            print(f"  {result.what} {result.shape} {result.model}: {shown}", flush=True)
        results.extend(new)
        report(final=False)

    def decode():
        batches = [int(b) for b in str(args.decode_batch).split(",") if b.strip()]
        if args.mtp:
            attach_random_mtp_heads(ours, args.seed)
        decoded, same, mtp = bench_decode(models, batches, args.decode_prompt, args.decode_new, vocab, device, args)
        extra["decode_same_tokens"] = same
        if mtp:
            extra["mtp"] = mtp
        return decoded

    measurements = {
        "prefill": lambda: bench_prefill(models, parse_shapes(args.prefill), vocab, device, args),
        "decode": decode,
        "train": lambda: bench_train(models, parse_shapes(args.train)[0], vocab, device, args),
    }
    for name in args.what:  # in the order asked: a run cut short keeps what matters most to the caller
        phase(name, measurements[name])

    summary = report(final=True)
    print()
    print_table(results, summary["ratios"], summary["memory_ratios"], memory_label)
    print()
    print(json.dumps(summary, separators=(",", ":")))
    return summary


if __name__ == "__main__":
    main()
