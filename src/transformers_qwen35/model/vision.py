"""The Qwen3.5 vision tower: patches in, one feature per 2x2 patch block out, ready to replace placeholder tokens.

The path of an image (or of one two-frame group of a video):

* ``pixel_values`` holds one row per 16x16 patch pair, ``(channel, frame, y, x)`` flattened, already in merge-block
  order (for each 2x2 block, its four patches row by row); a Conv3d with kernel = stride embeds each row;
* a learned 48x48 position table is bilinearly resampled (corner-aligned) to the image's patch grid and added;
* ``depth`` pre-LayerNorm blocks with bidirectional attention inside each temporal group of each item, and a 2-D
  rotary embedding from every patch's (row, column);
* the merger normalises each patch, concatenates the four patches of a block and maps them (Linear, exact GELU,
  Linear) to the language model's width.

Module attribute names are the checkpoint keys under ``model.visual.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.configuration import Qwen3_5VisionConfig

# The released checkpoints use theta 10,000 for the vision rotary embedding (later configs spell it out).
DEFAULT_VISION_ROPE_THETA = 10000.0


def merge_block_order(rows: torch.Tensor, merge: int) -> torch.Tensor:
    """Reorder a raster ``(h, w, ...)`` grid into the processor's merge-block order, flattened to ``(h*w, ...)``."""
    h, w = rows.shape[:2]
    blocks = rows.reshape(h // merge, merge, w // merge, merge, *rows.shape[2:])
    return blocks.transpose(1, 2).reshape(h * w, *rows.shape[2:])


def validate_grids(grid_thw: torch.Tensor, patches: int, config: Qwen3_5VisionConfig, what: str) -> None:
    """Cheap shape checks, so a wrong input fails with advice before the tower runs."""
    if grid_thw is None:
        raise ValueError(f"{what} were given without their grid: pass {what}_grid_thw from the processor too.")
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"{what}_grid_thw must have shape (items, 3) as (t, h, w); got {tuple(grid_thw.shape)}.")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise ValueError(f"{what}_grid_thw must hold integers (t, h, w patch counts), got {grid_thw.dtype}.")
    if bool((grid_thw <= 0).any()) or bool((grid_thw[:, 1:] % config.spatial_merge_size != 0).any()):
        raise ValueError(
            f"{what}_grid_thw rows must be positive with h and w multiples of {config.spatial_merge_size}; got "
            f"{grid_thw.tolist()}. Use the grids the processor returned."
        )
    expected = int(grid_thw.prod(-1).sum())
    if patches != expected:
        raise ValueError(
            f"{what} have {patches} patch rows but {what}_grid_thw {grid_thw.tolist()} describes {expected}: "
            "pass the pixel values and grids from the same processor call."
        )


class Qwen3_5VisionPatchEmbed(nn.Module):
    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.in_channels = config.in_channels
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.kernel, stride=self.kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = pixel_values.to(self.proj.weight.dtype).view(-1, self.in_channels, *self.kernel)
        return self.proj(patches).flatten(1)


class Qwen3_5VisionRotaryEmbedding(nn.Module):
    """2-D RoPE: a quarter of the head dim rotates with the patch row, a quarter with the column, each used twice."""

    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        self.theta = float(rope.get("rope_theta", DEFAULT_VISION_ROPE_THETA))
        self.spatial_dim = head_dim // 2

    def forward(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows_cols`` ``(N, 2)`` -> cos, sin ``(N, head_dim)`` in fp32."""
        exponents = torch.arange(0, self.spatial_dim, 2, device=rows_cols.device).float() / self.spatial_dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = (rows_cols.float()[:, :, None] * inv_freq).flatten(1)  # [row * f ; col * f]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Qwen3_5VisionAttention(nn.Module):
    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, rotary, cu_seqlens, max_length):
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).view(length, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = (t[:, None, :] for t in rotary)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, N, D)

        implementation = self.config._attn_implementation or "sdpa"
        if "flash" in implementation:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
            out, _ = attend(
                self, q, k, v, None, scaling=self.scaling, dropout=0.0, is_causal=False,
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_length, max_length_k=max_length,
            )  # fmt: skip
            out = out.reshape(length, -1)
        else:
            # Attention stays inside each temporal group of each item: run the groups one by one.
            sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            pieces = []
            for qs, ks, vs in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)):
                if implementation == "eager":
                    weights = torch.softmax((qs @ ks.transpose(-1, -2)).float() * self.scaling, dim=-1)
                    pieces.append((weights.to(vs.dtype) @ vs)[0].transpose(0, 1))
                else:
                    pieces.append(F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling)[0].transpose(0, 1))
            out = torch.cat(pieces, dim=0).reshape(length, -1)
        return self.proj(out)


class Qwen3_5VisionMLP(nn.Module):
    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class Qwen3_5VisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Qwen3_5VisionAttention(config)
        self.mlp = Qwen3_5VisionMLP(config)

    def forward(self, hidden_states, rotary, cu_seqlens, max_length):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rotary, cu_seqlens, max_length)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class Qwen3_5VisionPatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block's four patches as one vector -> Linear, GELU (erf), Linear."""

    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.block_width = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.block_width, self.block_width)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.block_width, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.norm(x).view(-1, self.block_width)
        return self.linear_fc2(self.act_fn(self.linear_fc1(blocks)))


class Qwen3_5VisionModel(nn.Module):
    """Patch rows ``(sum t*h*w, 1536)`` + grids ``(items, 3)`` -> features ``(sum t*h*w / 4, text hidden size)``."""

    def __init__(self, config: Qwen3_5VisionConfig):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.grid_side = int(round(config.num_position_embeddings**0.5))
        self.patch_embed = Qwen3_5VisionPatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.rotary_pos_emb = Qwen3_5VisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList(Qwen3_5VisionBlock(config) for _ in range(config.depth))
        self.merger = Qwen3_5VisionPatchMerger(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _position_embeddings(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned table resampled to every item's grid (corner-aligned bilinear), in patch order."""
        side, merge = self.grid_side, self.spatial_merge_size
        table = self.pos_embed.weight.view(side, side, -1).permute(2, 0, 1)[None].float()
        pieces = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
            pieces.append(merge_block_order(grid, merge).repeat(t, 1))
        return torch.cat(pieces).to(self.pos_embed.weight.dtype)

    def _rows_cols(self, grid_thw: torch.Tensor) -> torch.Tensor:
        merge = self.spatial_merge_size
        pieces = []
        for t, h, w in grid_thw.tolist():
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            pieces.append(merge_block_order(torch.stack([rows, cols], -1), merge).repeat(t, 1))
        return torch.cat(pieces).to(grid_thw.device)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, output_hidden_states: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """As built-in's tower: ``last_hidden_state`` the patch states after the last block ``(patches, hidden)``,
        ``pooler_output`` the merged features ``(patches / 4, text hidden)``; ``hidden_states`` (when asked) the
        blocks' input, then each block's output."""
        grid_thw = grid_thw.to(torch.long)
        hidden_states = self.patch_embed(pixel_values)
        hidden_states = hidden_states + self._position_embeddings(grid_thw.cpu()).to(hidden_states)
        rotary = self.rotary_pos_emb(self._rows_cols(grid_thw.cpu()).to(hidden_states.device))
        group_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = F.pad(group_sizes.cumsum(0), (1, 0)).to(device=hidden_states.device, dtype=torch.int32)
        max_length = int(group_sizes.max())
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states, rotary, cu_seqlens, max_length)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=self.merger(hidden_states),
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )
