"""Where our model's time goes, kernel by kernel: torch.profiler over one static decoding call, one training step
and one prefill of our model (random weights), each summarised as the kernels (CUDA) or operators (CPU) that take
the most time, with their counts.

    python benchmarks/profile_steps.py --size 0.8B --out out/profile_steps.txt

Explains our own figures; speed comparisons with built-in transformers live in ``compare_native.py``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import SIZES, _env, build_ours, make_optimizer, random_ids  # noqa: E402


def summary(trace, device, rows: int) -> str:
    """The top ``rows`` entries by self time on the device that ran them, with call counts and the total."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in trace.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    lines = [f"{'ms':>9} {'share':>6} {'calls':>6}  name (total {total / 1e3:.2f} ms, {len(events)} distinct)"]
    for event in events[:rows]:
        value = getattr(event, key)
        lines.append(f"{value / 1e3:9.3f} {value / total:6.1%} {event.count:6d}  {event.key[:110]}")
    return "\n".join(lines)


def profiled(function, device):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm-up: compilation, autotuning, graph capture, the allocator's growth stay out
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as trace:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return trace


def wall_ms(function, device, repeats: int = 3) -> float:
    """Median wall time of ``function`` without the profiler (it slows the host side down)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def python_time(function, rows: int = 25) -> str:
    """Where the host's Python time goes in one call (cProfile, by own time; it slows the call ~2x, the shares
    hold): when the device is idle much of the wall time, this is what it waits for."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    function()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    total = next((line.strip() for line in lines if "function calls" in line), "")
    return "python (cProfile, by own time): " + total + "\n" + "\n".join(lines[start : start + rows + 1])


def host_syncs(function, device, rows: int = 12) -> str:
    """Where ``function`` makes the host wait for the GPU (torch's sync debug mode), by the Python line that asked,
    most frequent first. Each one drains the GPU's queue: with many, host and device stop overlapping."""
    if device.type != "cuda":
        return "host syncs: only counted on CUDA"
    places: collections.Counter = collections.Counter()
    ours = ("transformers_qwen35", "fla", "transformers", "torch/optim")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if any(part in f.filename for part in ours)]
        frame = frames[-1] if frames else traceback.extract_stack()[-2]
        places[f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno} {frame.name}"] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            function()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    lines = [f"host syncs: {sum(places.values())}"]
    lines += [f"{count:6d}  {place}" for place, count in places.most_common(rows)]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="0.8B")
    parser.add_argument("--what", default="decode,train,prefill", help="comma-separated, run in this order")
    parser.add_argument("--decode", default="1x512x17", help="batch x prompt x new tokens")
    parser.add_argument("--train", type=int, default=4096, help="training tokens (batch 1)")
    parser.add_argument("--prefill", type=int, default=16384, help="prefill tokens (batch 1)")
    parser.add_argument("--rows", type=int, default=30, help="entries per table")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_ours(args.size, device, dtype)
    vocab = min(model.config.vocab_size, 32000)
    sections = []

    def report(title, function):
        trace = profiled(function, device)
        wall = wall_ms(function, device)
        busy = sum(getattr(e, "self_device_time_total", 0) for e in trace.key_averages()) / 1e3
        load = f"device busy {busy:.1f} ms of {wall:.1f} ms wall ({busy / wall:.0%})" if device.type == "cuda" else ""
        python = python_time(function) if device.type == "cuda" else ""
        text = f"## {title}\n{load}\n{host_syncs(function, device)}\n{summary(trace, device, args.rows)}\n{python}\n"
        print(text, flush=True)
        sections.append(text)

    for what in (w.strip() for w in args.what.split(",") if w.strip()):
        if what == "decode":
            batch, prompt, new = (int(x) for x in args.decode.lower().split("x"))
            ids = random_ids(batch, prompt, vocab, device, seed=1)

            def decode(ids=ids, new=new):
                with torch.no_grad():
                    model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0, cache_implementation="static",
                    )  # fmt: skip

            report(f"static generate(), batch {batch}, prompt {prompt}, {new} new tokens (prefill included)", decode)
        elif what in ("train", "train-graphed"):
            from transformers_qwen35.training import graphs as training_graphs

            ids = random_ids(1, args.train, vocab, device, seed=2)
            optimizer = make_optimizer(model, "adamw")
            graphed = "1" if what == "train-graphed" else "0"

            def step(ids=ids, optimizer=optimizer, graphed=graphed):
                with _env(training_graphs.TRAINING_GRAPHS_ENV, graphed):  # captured in the second warm-up step
                    model.train()
                    model(input_ids=ids, labels=ids).loss.backward()
                    optimizer.step()
                    model.zero_grad(set_to_none=True)
                    model.eval()

            title = "graphed training step" if graphed == "1" else "training step"
            report(f"{title}, 1 x {args.train} tokens, AdamW", step)
            training_graphs.release_training_graphs(model)
            del optimizer
        elif what == "prefill":
            ids = random_ids(1, args.prefill, vocab, device, seed=3)

            def prefill(ids=ids):
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)

            report(f"prefill, 1 x {args.prefill} tokens", prefill)
        else:
            parser.error(f"--what: unknown {what!r}; choose from decode, train, train-graphed, prefill")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# profile_steps {args.size} {dtype} {device}\n\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
