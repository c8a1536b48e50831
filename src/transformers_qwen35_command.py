"""The ``qwen35`` console command's entry point, kept outside the package so that nothing heavy is imported yet.

Importing ``transformers_qwen35`` loads torch and transformers (seconds); a Ctrl-C during that start-up would print
a traceback from deep inside an import. Here it exits quietly with 130, as a Ctrl-C at any later moment does.
"""

import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    try:
        from transformers_qwen35.cli.main import main as run
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    try:
        return run()
    except KeyboardInterrupt:  # between the package's own handlers (argument parsing, its first lines)
        print(file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
