"""Where a static decoding step's time goes: the whole ``generate()`` step, the captured block alone (CUDA graph
replay), the same block run eagerly, and the output head, for our model with random weights.

    python benchmarks/decode_breakdown.py --size 0.8B --batch 1,8

On a GPU the step minus (replay + head) is the host-side work of the decoding loop (logits processing, stopping
checks, bookkeeping); the weight bytes over the measured copy bandwidth give the floor a step cannot beat. Prints a
table and one JSON line; ``--json-out`` keeps them. Kernel-by-kernel tables: ``profile_steps.py``; speed comparisons
with built-in transformers: ``compare_native.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import SIZES, build_ours, random_ids  # noqa: E402


def device_seconds(function, repeats: int, device) -> float:
    """Median seconds of ``function()`` (CUDA events on a GPU, the wall clock on a CPU), after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            clock = time.perf_counter()
            function()
            times.append(time.perf_counter() - clock)
    return statistics.median(times)


def copy_bandwidth(device) -> float | None:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    if device.type != "cuda":
        return None
    source = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    target = torch.empty_like(source)
    return 2 * source.numel() / device_seconds(lambda: target.copy_(source), 20, device)


def generate_step(model, ids, new: int, repeats: int) -> float:
    """Seconds per step of static greedy ``generate()``: (time for ``new`` tokens - time for 1) / (new - 1)."""

    def run(count):
        def call():
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                    do_sample=False, pad_token_id=0, cache_implementation="static",
                )  # fmt: skip
            if ids.is_cuda:
                torch.cuda.synchronize()

        return call

    def wall(function):
        clock = time.perf_counter()
        function()
        return time.perf_counter() - clock

    long, short = run(new), run(1)
    long()  # captures the graph (kept for the next calls)
    longs = [wall(long) for _ in range(repeats)]
    shorts = [wall(short) for _ in range(repeats)]
    return (statistics.median(longs) - statistics.median(shorts)) / (new - 1)


def breakdown(model, batch: int, prompt: int, new: int, repeats: int, device) -> dict:
    from transformers_qwen35.generation.static_decode import _CACHES, forward_block

    vocab = min(model.config.vocab_size, 32000)
    ids = random_ids(batch, prompt, vocab, device, seed=prompt + batch)
    step = generate_step(model, ids, new, repeats)
    cache = _CACHES[model]  # the buffers the last call decoded on; replays below rewrite one slot in place
    block = torch.randint(1, vocab, (batch, 1), device=device)
    rope = torch.full((3, batch, 1), prompt + new, dtype=torch.long, device=device)
    result = {"batch": batch, "prompt": prompt, "new": new, "step_ms": step * 1e3, "capacity": cache.capacity}
    with torch.no_grad():
        graph = cache.graphs.get(1)
        if graph is not None:
            result["replay_ms"] = device_seconds(lambda: graph(block, rope), 50, device) * 1e3
        result["eager_block_ms"] = device_seconds(lambda: forward_block(model, cache, block, rope), 10, device) * 1e3
        hidden = torch.randn(batch, 1, model.config.hidden_size, device=device, dtype=next(model.parameters()).dtype)
        result["head_ms"] = device_seconds(lambda: model.lm_head(hidden).float().argmax(-1), 50, device) * 1e3
    core = result.get("replay_ms", result["eager_block_ms"]) + result["head_ms"]
    result["loop_overhead_ms"] = result["step_ms"] - core
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="0.8B")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_ours(args.size, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head counts once
    bandwidth = copy_bandwidth(device)
    summary = {
        "benchmark": "decode_breakdown",
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
        # Batch 1 reads every weight once per step (the embedding row gather aside): the floor of a step.
        "floor_ms": weight_bytes / bandwidth * 1e3 if bandwidth else None,
        "rows": [],
    }
    print(f"# decode_breakdown {args.size}: {weight_bytes / 1e9:.2f} GB of weights, {summary['device']}")
    for batch in (int(b) for b in args.batch.split(",") if b.strip()):
        row = breakdown(model, batch, args.prompt, args.new, args.repeats, device)
        summary["rows"].append(row)
        cells = ", ".join(f"{key} {value:.3f}" for key, value in row.items() if key.endswith("_ms"))
        print(f"  batch {batch}: {cells}", flush=True)
    if summary["floor_ms"]:
        print(f"  floor (weights / copy bandwidth): {summary['floor_ms']:.3f} ms per step")
    print(json.dumps(summary, separators=(",", ":")))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
