"""3-D rotary positions (T, H, W) for a token stream that mixes text, images and video frames.

A run of text tokens counts up on all three rows. A run of vision placeholders with a merged grid ``(h', w')`` takes
one start position ``p`` on the T row, ``p + row`` on the H row and ``p + column`` on the W row, and moves the
counter on by ``max(h', w')``. A video of ``t`` temporal groups is ``t`` separate runs (the processor puts a text
timestamp between groups), so its temporal order lives in the text, not on the T row.

The stream therefore ends ahead of (or behind) the plain token count; the difference per row, ``rope_deltas``,
is what later decoded tokens add to their index.
"""

from __future__ import annotations

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``mm_token_type_ids`` derived from placeholder ids: 0 text, 1 image, 2 video."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def vision_runs_per_item(image_grid_thw, video_grid_thw, spatial_merge_size):
    """The placeholder runs each modality's grids stand for, in order: ``{IMAGE: [(h', w'), ...], VIDEO: [...]}``."""
    runs = {IMAGE: [], VIDEO: []}
    for modality, grids in ((IMAGE, image_grid_thw), (VIDEO, video_grid_thw)):
        if grids is None:
            continue
        for t, h, w in grids.tolist():
            runs[modality].extend([(h // spatial_merge_size, w // spatial_merge_size)] * t)
    return runs


def rope_positions(
    types: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
    valid: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(3, B, T)`` and the number of real tokens each row holds.

    ``types`` ``(B, T)`` marks text/image/video tokens; grids are consumed in order across the batch; ``valid``
    ``(B, T)`` marks real tokens (pads get position 0 and are skipped); ``start`` ``(B,)`` is where each row's
    counter begins (0 for a fresh prompt).
    """
    batch, length = types.shape
    runs = vision_runs_per_item(image_grid_thw, video_grid_thw, spatial_merge_size)
    next_run = {IMAGE: iter(runs[IMAGE]), VIDEO: iter(runs[VIDEO])}
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    types_cpu = types.cpu()
    valid_cpu = valid.cpu().bool() if valid is not None else torch.ones(batch, length, dtype=torch.bool)
    starts = start.cpu().tolist() if start is not None else [0] * batch
    for row in range(batch):
        kept = valid_cpu[row].nonzero().flatten()
        pieces = []
        counter = int(starts[row])
        row_types = types_cpu[row, kept].tolist()
        for modality, group in itertools.groupby(row_types):
            size = len(list(group))
            if modality == TEXT:
                pieces.append(torch.arange(counter, counter + size).expand(3, -1))
                counter += size
                continue
            name = "image" if modality == IMAGE else "video frame-group"
            grid = next(next_run[modality], None)
            if grid is None:
                raise ValueError(
                    f"Row {row} has more {name} placeholder runs than the {name.split()[0]} grids describe. Build the "
                    "prompt with the processor, which writes one run per image and per video frame pair."
                )
            grid_h, grid_w = grid
            if size != grid_h * grid_w:
                raise ValueError(
                    f"Row {row} has a run of {size} {name} placeholder tokens where the grid needs {grid_h * grid_w} "
                    f"({grid_h} x {grid_w} merged patches). Let the processor expand the placeholders."
                )
            rows = torch.arange(grid_h).repeat_interleave(grid_w)
            cols = torch.arange(grid_w).repeat(grid_h)
            pieces.append(torch.stack([torch.full_like(rows, counter), counter + rows, counter + cols]))
            counter += max(grid_h, grid_w)
        if pieces:
            positions[:, row, kept] = torch.cat(pieces, dim=1)
    leftover = [modality for modality in (IMAGE, VIDEO) if next(next_run[modality], None) is not None]
    if leftover:
        which = " and ".join("image" if m == IMAGE else "video" for m in leftover)
        raise ValueError(
            f"More {which} grids were given than the prompt has placeholder runs for. Each image and each video "
            "frame pair needs its placeholder run in the text."
        )
    return positions.to(types.device), valid_cpu.sum(-1).to(types.device)
