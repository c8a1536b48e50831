"""Response parsing time by input size and shape: ``parse_response`` on the whole text and the streaming parser fed
in small deltas (as a server streams tokens). Shapes are the ones that once took quadratic time (long runs of
held-back whitespace) beside ordinary text and marker-like characters. Measures only; never passes or fails.

    python benchmarks/parser_time.py                 # 10 KB, 100 KB, 1 MB
    python benchmarks/parser_time.py --sizes 10000   # one size
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

from transformers_qwen35 import parse_response
from transformers_qwen35.chat.parsing import StreamingResponseParser

# name -> (thinking mode, text of about n characters)
SHAPES = {
    "words": (False, lambda n: ("hello world " * (n // 12 + 1))[:n]),
    "answer then blank lines": (False, lambda n: "answer" + "\n" * n + "end"),
    "reasoning then blank lines": (True, lambda n: "r" + "\n" * n + "</think>done"),
    "spaces": (False, lambda n: "a" + " " * n),
    "many '<'": (False, lambda n: "<" * n),
    "long tool argument": (False, lambda n: "<tool_call>\n<function=f>\n<parameter=x>\n" + "v\n" * (n // 2)),
}


def stream(text: str, thinking: bool, delta: int) -> None:
    parser = StreamingResponseParser(thinking=thinking)
    for start in range(0, len(text), delta):
        parser.feed(text[start : start + delta])
    parser.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated input sizes in characters")
    parser.add_argument("--delta", type=int, default=4, help="characters per streamed delta (about one token)")
    args = parser.parse_args()
    results = []
    print(f"| shape | size | parse_response s | streaming s (deltas of {args.delta}) |")
    print("|---|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        for name, (thinking, make) in SHAPES.items():
            text = make(size)
            start = time.perf_counter()
            parse_response(text, thinking=thinking)
            whole = time.perf_counter() - start
            start = time.perf_counter()
            stream(text, thinking, args.delta)
            streamed = time.perf_counter() - start
            results.append({"shape": name, "size": size, "parse_s": round(whole, 4), "stream_s": round(streamed, 4)})
            print(f"| {name} | {size:,} | {whole:.3f} | {streamed:.3f} |", flush=True)
    info = {"benchmark": "parser_time", "python": platform.python_version(), "machine": platform.processor()}
    info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(json.dumps({**info, "results": results}))


if __name__ == "__main__":
    main()
