"""Dense (per-location) embeddings from an open_clip vision tower, MaskCLIP-style.

ViT (``open_clip.transformer.VisionTransformer``): the tower runs up to its last
block; there the query-key attention is skipped and every token takes the value
path through the attention output projection (``maskclip`` keeps the block's
residual and MLP, ``clearclip`` drops both), then ``ln_post`` and ``proj``.
ResNet (``open_clip.modified_resnet.ModifiedResNet``): the attention pool's value
and output projections applied as 1x1 convolutions to the layer4 map.

    feats = dense_features(model.visual, x, mode="maskclip")   # (B, D, h, w), not normalised

Inputs are normalised images ``(B, 3, H, W)`` whose sides are multiples of
:func:`dense_stride`. Only public module attributes are used; nothing of
open_clip is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.ops import roi_align

from distill.config import ConfigError

DENSE_MODES = ("maskclip", "clearclip")


class DenseUnsupported(ConfigError):
    """The vision tower has no dense path (one-line message)."""


def dense_stride(visual: nn.Module) -> tuple[int, int]:
    """Pixels per dense-map cell ``(sy, sx)``: the patch size (ViT) or 32 (ResNet)."""
    if isinstance(visual, VisionTransformer):
        return tuple(visual.patch_size)
    if isinstance(visual, ModifiedResNet):
        return (32, 32)
    raise DenseUnsupported(
        f"dense embeddings need an open_clip VisionTransformer or ModifiedResNet tower, "
        f"got {type(visual).__name__}")


def interpolate_pos_embed(visual: VisionTransformer, grid: tuple[int, int]) -> Tensor:
    """``(1 + gh * gw, C)`` positional embeddings for a ``grid`` of patches.

    Bicubic over the patch grid as open_clip's ``resize_pos_embed`` does when it
    loads a checkpoint into a model of another size; the class position is kept.
    """
    pos = visual.positional_embedding
    g0 = tuple(visual.grid_size)
    if tuple(grid) == g0:
        return pos
    cls, img = pos[:1], pos[1:].reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=tuple(grid), mode="bicubic", align_corners=False,
                        antialias=True).to(pos.dtype)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def _value_path(block: nn.Module, y: Tensor) -> Tensor:
    """Attention branch of ``block`` with each token attending only to itself: ``(B, L, C)``."""
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):  # open_clip ResidualAttentionBlock
        if attn.in_proj_weight is None:
            raise DenseUnsupported("dense embeddings need packed q/k/v in_proj weights")
        c = attn.embed_dim
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c:]
        return attn.out_proj(F.linear(y, attn.in_proj_weight[2 * c:], bias))
    if hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj"):  # open_clip Attention
        c = attn.in_proj_weight.shape[1]
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c:]
        v = F.linear(y, attn.in_proj_weight[2 * c:], bias)
        if attn.head_scale is not None:
            b, n = v.shape[:2]
            v = (v.view(b, n, attn.num_heads, -1) * attn.head_scale.view(attn.num_heads, 1))
            v = v.reshape(b, n, c)
        out = attn.out_proj(attn.ln_inner(v))
        return block.ln_attn(out) if hasattr(block, "ln_attn") else out
    raise DenseUnsupported(f"unsupported attention module {type(attn).__name__}")


def _keys(block: nn.Module, y: Tensor) -> Tensor:
    """Attention keys of ``block`` for the normalised tokens ``y``: ``(B, L, C)``."""
    attn = block.attn
    weight = getattr(attn, "in_proj_weight", None)
    if weight is None:
        raise DenseUnsupported("key smoothing needs packed q/k/v in_proj weights")
    c = weight.shape[1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[c:2 * c]
    return F.linear(y, weight[c:2 * c], bias)


def vit_dense(visual: VisionTransformer, x: Tensor, mode: str = "maskclip",
              keys: bool = False, with_keys: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """x (B, 3, H, W) normalised, H and W multiples of the patch size -> (B, D, H/p, W/p);
    ``keys``: the last block's attention keys (B, C, H/p, W/p) instead; ``with_keys``: both,
    from one pass of the tower (MaskCLIP's key smoothing beside the features)."""
    if mode not in DENSE_MODES:
        raise ConfigError(f"dense_mode must be one of {DENSE_MODES}, got '{mode}'")
    if visual.attn_pool is not None or visual.proj is None:
        raise DenseUnsupported("dense embeddings need a ViT with a token projection "
                               "(no attentional pooler)")
    b = x.shape[0]
    t = visual.conv1(x.to(visual.conv1.weight.dtype))  # (B, C, gh, gw)
    grid = tuple(t.shape[-2:])
    t = t.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
    cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, -1, -1)
    t = torch.cat([cls, t], dim=1) + interpolate_pos_embed(visual, grid).to(t.dtype)
    t = visual.ln_pre(t)  # patch dropout is the identity in eval mode
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        t = t.transpose(0, 1)
    for blk in blocks[:-1]:
        t = blk(t)
    if not batch_first:
        t = t.transpose(0, 1)
    last = blocks[-1]
    y = last.ln_1(t)
    k = _keys(last, y)[:, 1:].transpose(1, 2).reshape(b, -1, *grid) if keys or with_keys \
        else None
    if keys:
        return k
    out = _value_path(last, y)
    if mode == "maskclip":
        t = t + last.ls_1(out)
        t = t + last.ls_2(last.mlp(last.ln_2(t)))
    else:
        t = out
    t = visual.ln_post(t) @ visual.proj  # (B, 1 + gh*gw, D)
    t = t[:, 1:].transpose(1, 2).reshape(b, -1, *grid)
    return (t, k) if with_keys else t


def resnet_dense(visual: ModifiedResNet, x: Tensor, keys: bool = False,
                 with_keys: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """x (B, 3, H, W) normalised, H and W multiples of 32 -> (B, D, H/32, W/32); ``keys``:
    the attention pool's keys (B, C, H/32, W/32) instead (its positional embedding left out,
    as it is sized for the pretraining grid); ``with_keys``: both, from one pass."""
    t = visual.stem(x.to(visual.conv1.weight.dtype))
    t = visual.layer4(visual.layer3(visual.layer2(visual.layer1(t))))
    pool = visual.attnpool
    k = F.conv2d(t, pool.k_proj.weight[:, :, None, None], pool.k_proj.bias) \
        if keys or with_keys else None
    if keys:
        return k
    t = F.conv2d(t, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
    t = F.conv2d(t, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
    return (t, k) if with_keys else t


def dense_features(visual: nn.Module, x: Tensor, mode: str = "maskclip",
                   keys: bool = False, with_keys: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Dispatch on the tower type: x (B, 3, H, W) normalised -> (B, D, h, w), not normalised
    (``keys``: the last attention's keys (B, C, h, w), for MaskCLIP's key smoothing;
    ``with_keys``: (features, keys) from one pass)."""
    if mode not in DENSE_MODES:
        raise ConfigError(f"dense_mode must be one of {DENSE_MODES}, got '{mode}'")
    if isinstance(visual, VisionTransformer):
        return vit_dense(visual, x, mode, keys, with_keys)
    if isinstance(visual, ModifiedResNet):
        return resnet_dense(visual, x, keys, with_keys)
    dense_stride(visual)  # raises DenseUnsupported
    raise AssertionError


def pool_regions(features: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """features (D, h, w) of an image of ``image_size`` (H, W) pixels, boxes (N, 4) xyxy in
    those pixels -> (N, D): each box's average of the map (RoIAlign with one output bin and
    adaptive sampling, aligned: a box on cell edges averages those cells' centres), not
    normalised. :meth:`Teacher.regions` in dense mode and the CLIPSelf loss pool with it."""
    h, w = features.shape[-2:]
    scale = boxes.new_tensor([w / image_size[1], h / image_size[0]] * 2)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes * scale], 1)
    return roi_align(features[None], rois.to(features.dtype), (1, 1), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True).flatten(1)


def refine_logits(logits: Tensor, keys: Tensor | None = None, key_smoothing: float = 0.0,
                  prompt_denoising: float = 0.0) -> Tensor:
    """MaskCLIP's two training-free refinements of dense text logits (B, C, h, w).

    Prompt denoising (threshold ``prompt_denoising``, MaskCLIP 0.5): a class whose
    softmax confidence stays below the threshold at every location of an image is
    taken as absent there and its logits set to -1e4 (the image's most confident
    class is always kept). Key smoothing (threshold ``key_smoothing``, MaskCLIP 1.0):
    at every location whose top softmax confidence is below the threshold, the class
    probabilities are replaced by their sum over all locations weighted by the cosine
    similarity of the last attention's ``keys`` (B, K, h, w), negative weights clipped
    to 0, renormalised over classes. Returns log-probabilities where smoothing applied
    (argmax and softmax are what callers use), the logits elsewhere; 0 disables a step.
    """
    out = logits.float().clone()
    b, c = out.shape[:2]
    if prompt_denoising > 0:
        conf = out.softmax(1).flatten(2).amax(-1)  # (B, C): best confidence over locations
        absent = conf < prompt_denoising
        absent[torch.arange(b), conf.argmax(1)] = False
        out[absent] = -1e4
    if key_smoothing > 0:
        if keys is None or keys.shape[0] != b or keys.shape[-2:] != out.shape[-2:]:
            raise ValueError("key smoothing needs keys (B, K, h, w) on the logits' grid")
        prob = out.softmax(1).flatten(2)  # (B, C, N)
        k = F.normalize(keys.float().flatten(2), dim=1)  # (B, K, N)
        weight = (k.transpose(1, 2) @ k).clamp_min(0)  # (B, N, N) cosine similarity
        smoothed = prob @ weight.transpose(1, 2)  # (B, C, N): sum_j w_ij p_cj
        smoothed = smoothed / smoothed.sum(1, keepdim=True).clamp_min(1e-12)
        unsure = (prob.amax(1, keepdim=True) < key_smoothing).expand_as(prob)
        prob = torch.where(unsure, smoothed, prob)
        out = torch.where(unsure, prob.clamp_min(1e-12).log(), out.flatten(2)).view_as(out)
    return out
