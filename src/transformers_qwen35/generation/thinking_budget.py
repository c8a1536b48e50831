"""A cap on how long Qwen3.5 may think: ``ThinkingBudgetProcessor``.

In thinking mode the prompt ends with ``<think>\\n`` and the model writes its reasoning, then ``\\n</think>\\n\\n``
and the answer. Small models in particular can reason for thousands of tokens. Once a row has spent ``budget``
tokens of reasoning, this processor makes it write the closing ``\\n</think>\\n\\n`` (one token per step, as any
other token) and then lets it answer freely.

The processor keeps no state between steps: each call reads each row's tokens (the last ``<think>``, whether a
``</think>`` followed, how many tokens lie between). That is what makes it correct under beam search, where rows
are reordered between steps, and reusable across ``generate`` calls. Rows that are not reasoning (no ``<think>``,
or already closed on their own) are never touched.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

THINK_OPEN = "<think>"
CLOSING_TEXT = "\n</think>\n\n"


class ThinkingBudgetProcessor(LogitsProcessor):
    """Force ``\\n</think>\\n\\n`` once a row has reasoned for ``budget`` tokens.

    ``budget`` counts the reasoning tokens after ``<think>\\n`` (the newline the generation prompt already holds is
    not counted). Give the tokenizer, or the ids: ``think_open_id`` (``<think>``) and ``closing_ids`` (the ids of
    ``"\\n</think>\\n\\n"``, whose second id must be ``</think>``).

    >>> budget = ThinkingBudgetProcessor(512, tokenizer)
    >>> model.generate(**inputs, logits_processor=[budget], max_new_tokens=2048)
    """

    def __init__(self, budget: int, tokenizer=None, *, think_open_id: int | None = None, closing_ids=None):
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"budget must be a whole number of tokens >= 0, got {budget!r}.")
        if tokenizer is not None:
            think_open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
            closing_ids = tokenizer.encode(CLOSING_TEXT, add_special_tokens=False)
        if think_open_id is None or closing_ids is None:
            raise ValueError("Pass the tokenizer, or both think_open_id and closing_ids.")
        closing_ids = [int(token) for token in closing_ids]
        if len(closing_ids) < 2 or think_open_id in closing_ids:
            raise ValueError(
                f"closing_ids {closing_ids} must be the ids of {CLOSING_TEXT!r}: a newline, </think>, then newlines. "
                "Does the tokenizer know <think> and </think> as single tokens?"
            )
        self.budget = budget
        self.think_open_id = int(think_open_id)
        self.newline_id = closing_ids[0]
        self.think_close_id = closing_ids[1]
        self.closing_ids = closing_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = [self._forced_token(row) for row in input_ids.tolist()]
        rows = [index for index, token in enumerate(forced) if token is not None]
        if not rows:
            return scores
        scores = scores.clone()
        tokens = torch.tensor([forced[index] for index in rows], device=scores.device)
        rows_tensor = torch.tensor(rows, device=scores.device)
        scores[rows_tensor] = torch.finfo(scores.dtype).min
        scores[rows_tensor, tokens] = 0.0
        return scores

    def _forced_token(self, row: list[int]) -> int | None:
        """The token this row must take next, or None to leave it alone."""
        if self.think_open_id not in row:
            return None
        start = len(row) - 1 - row[::-1].index(self.think_open_id) + 1  # first position after the last <think>
        if start < len(row) and row[start] == self.newline_id:
            start += 1  # the generation prompt's own newline is not reasoning
        after = row[start:]
        if self.think_close_id not in after:
            if len(after) < self.budget:
                return None
            # Over budget: write the closing, continuing a newline the model may have just written itself.
            return self.think_close_id if after and after[-1] == self.newline_id else self.newline_id
        close = after.index(self.think_close_id)
        if close < self.budget:
            return None  # closed on its own: while under budget every token was the model's choice
        # We closed it: finish the closing newlines, then hand the row back.
        written = after[close + 1 :]
        remaining = self.closing_ids[2:]
        if len(written) < len(remaining) and written == remaining[: len(written)]:
            return remaining[len(written)]
        return None
