"""Faster forward passes for segment_anything's modules, without copying their code.

* ``SDPAEncoderAttention`` / ``SDPATokenAttention``: subclasses of segment_anything's image-encoder
  ``Attention`` and two-way-transformer ``Attention`` that only override ``forward`` to call
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA,
  no materialised fp32 attention matrix). The decomposed relative-position terms of the image
  encoder (MViTv2, ``add_decomposed_rel_pos``) enter as an additive attention bias built from
  segment_anything's own ``get_rel_pos``. Windowed blocks are untouched: ``Block.forward``
  partitions into windows before calling ``attn`` and the override sees a window as its (H, W).
* ``set_attention(module, "sdpa" | "reference")`` switches every such attention inside
  ``module`` in place by changing the instance's class (parameters, buffers, ``state_dict``
  keys and checkpoints stay exactly the same; "reference" restores segment_anything's forward).
* ``upload_uint8``: a batch of uint8 arrays of any shapes to the device with ONE pinned buffer
  and one non-blocking copy.
* ``decode_single_masks``: segment_anything's ``MaskDecoder`` run once for a batch of images x
  prompts (``MaskDecoder.predict_masks`` repeats ONE image embedding for all prompts, so callers
  had to loop over images). It calls the decoder's own sub-modules (two-way transformer, output
  upscaling, hypernetwork MLP, IoU head) and computes only the single-mask output
  (``multimask_output=False``), skipping the three multimask hypernetworks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch.nn import functional as F

ATTENTION_KINDS = ("sdpa", "reference")


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> torch.Tensor:
    """The additive attention bias of ``add_decomposed_rel_pos`` for SDPA.

    q: (B, heads, q_h * q_w, C) unscaled queries; rel_pos_h (L_h, C), rel_pos_w (L_w, C).
    Returns (B, heads, q_h * q_w, k_h * k_w) in q's dtype: bias[.., (i, j), (k, l)] =
    q(i, j) . R_h[i - k] + q(i, j) . R_w[j - l], exactly the terms segment_anything adds.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    # get_rel_pos builds its index with torch.arange on the default device; making that the
    # tensors' device avoids a blocking pageable host->device copy in every attention layer.
    with torch.device(q.device):
        r_h = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)  # (q_h, k_h, C)
        r_w = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)  # (q_w, k_w, C)
    batch, heads, _, dim = q.shape
    r_q = q.reshape(batch, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, q_h * q_w, k_h * k_w)


class SDPAEncoderAttention(sam_image_encoder.Attention):
    """segment_anything's image-encoder attention through SDPA. Shapes: x (B, H, W, dim) -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, head_dim)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.proj(out)


class SDPATokenAttention(sam_transformer.Attention):
    """segment_anything's two-way-transformer attention through SDPA. q (B, Nq, dim), k/v (B, Nk, dim)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim), as SAM
        return self.out_proj(self._recombine_heads(out))


_TO_SDPA = {sam_image_encoder.Attention: SDPAEncoderAttention, sam_transformer.Attention: SDPATokenAttention}
_TO_REFERENCE = {fast: reference for reference, fast in _TO_SDPA.items()}


def set_attention(module: torch.nn.Module, kind: str = "sdpa") -> int:
    """Switch every segment_anything attention inside ``module`` to ``kind`` in place.

    ``"sdpa"``: the SDPA subclasses above; ``"reference"``: segment_anything's own forward.
    Only the class of each instance changes (same parameters and state_dict). Returns how many
    attention modules now use ``kind``.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    table = _TO_SDPA if kind == "sdpa" else _TO_REFERENCE
    targets = set(table.values())
    count = 0
    for child in module.modules():
        target = table.get(type(child))
        if target is not None:
            child.__class__ = target
        count += type(child) in targets
    return count


def attention_kind(module: torch.nn.Module) -> str | None:
    """"sdpa", "reference", "mixed" or None (no segment_anything attention inside ``module``)."""
    kinds = {("sdpa" if type(m) in _TO_REFERENCE else "reference") for m in module.modules() if type(m) in _TO_REFERENCE or type(m) in _TO_SDPA}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def decode_single_masks(
    mask_decoder: MaskDecoder,
    *,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompts: torch.Tensor,
    dense_prompts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask decoder output for K prompts on each of B images, in one call.

    Args:
        image_embeddings: (B, c, h, w).
        image_pe: (1, c, h, w), ``PromptEncoder.get_dense_pe()``.
        sparse_prompts: (B, K, n, c): prompt k of image b has n sparse tokens.
        dense_prompts: (B * K, c, h, w), or anything broadcastable to it (e.g. (1, c, 1, 1) for
            the no-mask embedding).
    Returns low-res mask logits (B, K, 4h, 4w) and predicted IoU (B, K) - the values
    ``mask_decoder(..., multimask_output=False)`` gives per image, prompt by prompt.
    """
    batch, prompts, length, channels = sparse_prompts.shape
    _, _, height, width = image_embeddings.shape
    rows = batch * prompts
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0).to(sparse_prompts.dtype)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(rows, -1, -1), sparse_prompts.reshape(rows, length, channels)], dim=1)
    # Image b's embedding for each of its K prompts (repeat_interleave order: b-major).
    src = image_embeddings.unsqueeze(1).expand(batch, prompts, channels, height, width).reshape(rows, channels, height, width)
    src = src + dense_prompts
    # The transformer only adds the positional encoding, so one copy broadcasts over all rows.
    hs, src = mask_decoder.transformer(src, image_pe.to(src.dtype), tokens)
    iou_token_out = hs[:, 0, :]
    mask_token_out = hs[:, 1, :]  # token 0 = the single-mask output
    upscaled = mask_decoder.output_upscaling(src.transpose(1, 2).reshape(rows, channels, height, width))
    hyper = mask_decoder.output_hypernetworks_mlps[0](mask_token_out)  # (rows, c/8)
    up_channels, up_height, up_width = upscaled.shape[1:]
    masks = torch.bmm(hyper.unsqueeze(1), upscaled.reshape(rows, up_channels, up_height * up_width))
    iou = mask_decoder.iou_prediction_head(iou_token_out)[:, 0]
    return masks.reshape(batch, prompts, up_height, up_width), iou.reshape(batch, prompts)


def upload_uint8(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """uint8 arrays (any shapes) -> uint8 tensors of the same shapes on ``device``.

    On CUDA the bytes are packed into one pinned host buffer (PyTorch's caching host allocator
    reuses it) and copied with ``non_blocking=True``, so the copy overlaps whatever the device is
    still doing; on the CPU the packed buffer is returned as views (no further copy).
    """
    arrays = [np.asarray(a) for a in arrays]
    for array in arrays:
        if array.dtype != np.uint8:
            raise ValueError(f"expected uint8 arrays, got {array.dtype}")
    cuda = torch.device(device).type == "cuda"
    host = torch.empty(sum(a.size for a in arrays), dtype=torch.uint8, pin_memory=cuda)
    host_view = host.numpy()
    offset = 0
    for array in arrays:
        np.copyto(host_view[offset : offset + array.size].reshape(array.shape), array)
        offset += array.size
    flat = host.to(device, non_blocking=True) if cuda else host
    out, offset = [], 0
    for array in arrays:
        out.append(flat[offset : offset + array.size].view(array.shape))
        offset += array.size
    return out
