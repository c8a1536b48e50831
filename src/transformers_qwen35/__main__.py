"""``python -m transformers_qwen35``: the ``qwen35`` command."""

import sys

from .cli.main import main

sys.exit(main())
