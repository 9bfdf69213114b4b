"""A timm VisionTransformer with Siamese masking and packed variable-length attention.

``ViTEncoder.forward_features(x, keep=0.5)`` runs patch embedding, then ``fastcon.siamese_mask``
keeps ``keep`` of the patch tokens and adds their positional embeddings in one fused pass (the
class / register tokens get theirs separately), then the blocks and the final norm on the kept
tokens only. ``keep=None`` (the teacher branch) keeps every token. Attention is
``F.scaled_dot_product_attention``; ``forward_features_packed`` concatenates batches with
different token counts (e.g. a masked online view and an unmasked one, or two resolutions) into
one sequence and attends within each sample only, with xformers' ``BlockDiagonalMask`` and
``memory_efficient_attention`` when xformers and a CUDA device are present, else SDPA with the
block-diagonal mask materialised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastcon.models.bands import resolve_bands
from fastcon.models.weights import input_channels


def _xformers_ops():
    if importlib.util.find_spec("xformers") is None:
        return None
    import xformers.ops as xops

    return xops


def _xformers_usable(x: torch.Tensor) -> bool:
    """xformers' memory-efficient kernels run on CUDA tensors only."""
    return x.is_cuda


def _attention(attn: nn.Module, x: torch.Tensor, bias) -> torch.Tensor:
    """timm ``Attention`` with its own weights; ``bias`` None, a bool mask, or an xformers attn bias."""
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if bias is not None and not isinstance(bias, torch.Tensor):  # xformers: (B, N, H, hd) layout
        q, k, v = qkv.unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout)
        out = out.reshape(b, n, heads * head_dim)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _block(blk: nn.Module, x: torch.Tensor, bias) -> torch.Tensor:
    """timm ``Block`` (pre-norm, LayerScale, drop path) with our attention call."""
    x = x + blk.drop_path1(blk.ls1(_attention(blk.attn, blk.norm1(x), bias)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def block_diagonal_mask(seqlens: Sequence[int], device) -> torch.Tensor:
    """(T, T) bool, True where query and key belong to the same packed sample (T = sum(seqlens))."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.as_tensor(seqlens, device=device))
    return ids[:, None] == ids[None, :]


class ViTEncoder(nn.Module):
    """Siamese-masking encoder around a timm ``VisionTransformer`` (kept as ``.backbone``).

    ``forward_features`` returns the normed prefix (class, register) tokens followed by the kept
    patch tokens, ``(B, num_prefix_tokens + K, D)``; ``forward`` returns the class token (B, D).
    """

    def __init__(self, backbone: nn.Module, bands=None):
        super().__init__()
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"backbone must be a timm VisionTransformer, got {type(backbone).__name__}")
        for i, blk in enumerate(backbone.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise TypeError(f"backbone.blocks[{i}] must be a timm Block with Attention, got {type(blk).__name__}")
        if not isinstance(backbone.patch_drop, nn.Identity):
            raise ValueError("backbone must have patch_drop_rate=0: Siamese masking replaces patch dropout")
        self.backbone = backbone
        self.bands = resolve_bands(bands, input_channels(backbone), required=False)
        self.embed_dim = backbone.embed_dim
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.grad_checkpointing = False

    @property
    def num_features(self) -> int:
        return self.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    # ---- embedding ----------------------------------------------------------------------------

    def _patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        pe = self.backbone.patch_embed
        if x.dim() != 4 or x.shape[1] != pe.proj.in_channels:
            raise ValueError(f"x must be (B, {pe.proj.in_channels}, H, W), got shape {tuple(x.shape)}")
        tokens = pe(x)
        if tokens.dim() == 4:  # dynamic_img_size: NHWC
            grid = (tokens.shape[1], tokens.shape[2])
            tokens = tokens.flatten(1, 2)
        else:
            grid = tuple(pe.grid_size)
        return tokens, grid

    def _pos_embed(self, grid) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix-token part or None, patch part (1, L, D) or None) of the positional embedding."""
        from timm.layers import resample_abs_pos_embed

        vit = self.backbone
        if vit.pos_embed is None:
            return None, None
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = vit.pos_embed
        if tuple(grid) != tuple(vit.patch_embed.grid_size):
            pos = resample_abs_pos_embed(
                pos, new_size=grid, old_size=vit.patch_embed.grid_size, num_prefix_tokens=n_prefix
            )
        return (pos[:, :n_prefix] if n_prefix else None), pos[:, n_prefix:]

    def embed(self, x, keep=None, ids_keep=None, generator=None):
        """Patch embedding + positional embedding + masking; returns (tokens, ids_keep or None)."""
        import fastcon

        vit = self.backbone
        patches, grid = self._patch_tokens(x)
        prefix_pos, patch_pos = self._pos_embed(grid)
        if keep is None and ids_keep is None:  # teacher branch: every token
            visible = patches if patch_pos is None else patches + patch_pos
        else:
            if patch_pos is not None:  # under autocast the patch tokens are bf16/fp16
                patch_pos = patch_pos.to(patches.dtype)
            # one fused pass: gather the kept tokens and add their positional embeddings
            visible, ids_keep = fastcon.siamese_mask(
                patches,
                keep,
                pos_embed=patch_pos,
                ids_keep=ids_keep,
                generator=generator if ids_keep is None else None,
            )
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if prefix_pos is not None:
                prefix = prefix + prefix_pos
            visible = torch.cat([prefix, visible], dim=1)
        return vit.norm_pre(vit.pos_drop(visible)), ids_keep

    # ---- transformer ----------------------------------------------------------------------------

    def _run_block(self, blk, x, bias):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(_block, blk, x, bias, use_reentrant=False)
        return _block(blk, x, bias)

    def blocks(self, x: torch.Tensor, bias=None, take: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks; also returns the outputs of blocks ``take[0]``, ``take[1]``, ..."""
        outputs = {}
        for i, blk in enumerate(self.backbone.blocks):
            x = self._run_block(blk, x, bias)
            if i in take:
                outputs[i] = x
        return x, [outputs[i] for i in take]

    def forward_features(self, x, keep=None, ids_keep=None, generator=None, return_ids: bool = False):
        """(B, P + K, D) normed tokens: P prefix tokens then the K kept patch tokens (K = L when keep is None).

        ``keep``: kept patch count (int) or ratio in (0, 1]; ``ids_keep`` (B, K): which patches (e.g.
        the other branch's, to mask both alike). ``return_ids`` also returns ``ids_keep`` (None when
        nothing is masked).
        """
        tokens, ids_keep = self.embed(x, keep, ids_keep, generator)
        tokens, _ = self.blocks(tokens)
        tokens = self.backbone.norm(tokens)
        return (tokens, ids_keep) if return_ids else tokens

    def forward(self, x, keep=None, ids_keep=None, generator=None) -> torch.Tensor:
        """The class token of ``forward_features`` (B, D) (mean patch token when the model has none)."""
        tokens = self.forward_features(x, keep, ids_keep, generator)
        if self.backbone.cls_token is not None:
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def forward_features_packed(self, xs: Sequence[torch.Tensor], keeps=None, ids_keeps=None, generator=None):
        """``forward_features`` for several batches with different token counts, as one packed sequence.

        ``xs[i]`` (B_i, C, H_i, W_i) is masked with ``keeps[i]`` (None: all tokens) or
        ``ids_keeps[i]``; every sample attends only to its own tokens. Returns the list of
        (B_i, P + K_i, D) outputs and the list of ids_keep.
        """
        n = len(xs)
        keeps = list(keeps) if keeps is not None else [None] * n
        ids_keeps = list(ids_keeps) if ids_keeps is not None else [None] * n
        if len(keeps) != n or len(ids_keeps) != n:
            raise ValueError(f"keeps and ids_keeps must have one entry per batch in xs ({n})")
        seqs, ids_out = [], []
        for x, keep, ids in zip(xs, keeps, ids_keeps):
            tokens, ids = self.embed(x, keep, ids, generator)
            seqs.append(tokens)
            ids_out.append(ids)
        seqlens = [s.shape[1] for s in seqs for _ in range(s.shape[0])]
        packed = torch.cat([s.reshape(-1, self.embed_dim) for s in seqs])[None]
        xops = _xformers_ops()
        if xops is not None and _xformers_usable(packed):
            bias = xops.fmha.BlockDiagonalMask.from_seqlens(seqlens)
        else:
            bias = block_diagonal_mask(seqlens, packed.device)
        packed, _ = self.blocks(packed, bias)
        packed = self.backbone.norm(packed)[0]
        outs, start = [], 0
        for s in seqs:
            size = s.shape[0] * s.shape[1]
            outs.append(packed[start : start + size].reshape(s.shape))
            start += size
        return outs, ids_out

    # ---- multi-scale features for the diffusion decoder ------------------------------------------

    def pyramid_indices(self) -> list[int]:
        depth = len(self.backbone.blocks)
        # four evenly spaced blocks (repeats for depth < 4)
        return [max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)]

    @property
    def pyramid_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.pyramid_indices())

    @property
    def pyramid_strides(self) -> list[int]:
        return [self.patch_size] * len(self.pyramid_indices())

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normed patch tokens of evenly spaced blocks as (B, D, h, w) maps (all at stride ``patch_size``)."""
        b = x.shape[0]
        tokens, _ = self.embed(x)
        _, taken = self.blocks(tokens, take=self.pyramid_indices())
        h, w = self.backbone.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        p = self.num_prefix_tokens
        return [self.backbone.norm(t)[:, p:].transpose(1, 2).reshape(b, self.embed_dim, h, w) for t in taken]
