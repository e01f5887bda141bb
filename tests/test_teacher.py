"""The open_clip teacher adapter on tiny random models (configs/shapes/teacher/*.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distill.config import ConfigError, TeacherConfig
from distill.data.vocab import COLORS
from distill.teacher import (
    TEMPLATE_SETS,
    Teacher,
    TeacherError,
    build_teacher,
    cut_crops,
    enlarge_boxes,
    fill,
    templates,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "teacher"
NAMES = ["star", "ring", "arrow"]


def _build(name: str, seed: int = 0, **kw) -> Teacher:
    torch.manual_seed(seed)
    return build_teacher(model=name, model_config=str(CONFIGS / f"{name}.json"), **kw)


@pytest.fixture(scope="module")
def vit() -> Teacher:
    return _build("tiny_vit", templates="shapes")


@pytest.fixture(scope="module")
def rn() -> Teacher:
    return _build("tiny_rn", templates="shapes")


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _norm_image(t: Teacher, img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(t.mean).view(3, 1, 1)
    std = torch.tensor(t.std).view(3, 1, 1)
    return (img.float() / 255 - mean) / std


# --------------------------------------------------------------------------- prompts / text


def test_the_teachers_temperature_is_its_own_unless_set(vit):
    """teacher.temperature: the teacher's own logits (on proposals, MaskCLIP, pseudo-labels)
    are cosine / it; null takes 1 / the learned logit scale, apart from model.temperature."""
    assert vit.temperature == pytest.approx(1 / float(vit.model.logit_scale.exp()), rel=1e-7)
    assert _build("tiny_vit", temperature=0.05).temperature == 0.05
    with pytest.raises(TeacherError, match="temperature must be positive"):
        _build("tiny_vit", temperature=0.0)


def test_template_sets():
    assert len(TEMPLATE_SETS["openai_imagenet"]) == 80
    assert len(TEMPLATE_SETS["vild"]) == 63
    assert len(TEMPLATE_SETS["simple"]) == 7
    assert TEMPLATE_SETS["openai_imagenet"][0] == "a bad photo of a {}."
    assert fill(TEMPLATE_SETS["vild"][0], "apple") == "There is an apple in the scene."
    assert fill(TEMPLATE_SETS["vild"][2], "star") == "This is a photo of a star in the scene."
    assert templates(["x {}"]) == ("x {}",)
    with pytest.raises(ConfigError, match="unknown template set 'nope'"):
        templates("nope")
    with pytest.raises(ConfigError, match="contain"):
        templates(["no placeholder"])


def test_text_is_prompt_ensemble(vit):
    got = vit.text(NAMES)
    assert got.shape == (3, vit.embed_dim) == (3, 128)
    tok = open_clip.get_tokenizer("tiny_vit")
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            prompts = [f"a {name}"] + [f"a {c} {name}" for c in COLORS] + [
                f"a photo of a {c} {name}" for c in COLORS]
            e = F.normalize(vit.model.encode_text(tok(prompts)), dim=-1)
            want = F.normalize(e.mean(0), dim=0)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    # another template set gives other embeddings; batching across classes changes nothing
    other = vit.text(NAMES, templates="simple")
    assert (other - got).abs().max() > 1e-3
    small = Teacher(vit.model, "tiny_vit", templates="simple", batch_size=7)  # a class per batch
    torch.testing.assert_close(small.text(NAMES), other, atol=1e-5, rtol=1e-5)
    assert vit.text([]).shape == (0, 128)


def test_text_cache_returns_fresh_usable_tensors(vit):
    a = vit.text(NAMES)
    a.zero_()  # the caller's copy; the cache must not change
    b = vit.text(NAMES)
    assert b.norm(dim=-1).allclose(torch.ones(3))
    w = torch.randn(128, requires_grad=True)  # usable as a classifier (not an inference tensor)
    (b @ w).sum().backward()
    torch.testing.assert_close(w.grad, b.sum(0))


# --------------------------------------------------------------------------- crops


def test_enlarge_boxes_hand_computed():
    boxes = torch.tensor([[10, 20, 50, 40], [100, 80, 120, 100], [-10, 5, 30, 50]])
    got = enlarge_boxes(boxes, 1.5, height=100, width=120)
    want = torch.tensor([[0, 15, 60, 45], [95, 75, 120, 100], [0, 0, 40, 61.25]])
    # third: centre (10, 27.5), size 40x45 -> 60x67.5 -> [-20, -6.25, 40, 61.25] clipped
    torch.testing.assert_close(got, want.float())
    torch.testing.assert_close(enlarge_boxes(boxes, 1.0, 100, 120),
                               torch.tensor([[10, 20, 50, 40], [100, 80, 120, 100],
                                             [0, 5, 30, 50]]).float())


def _manual_crop(x, x0, y0, x1, y1, level, size=64):
    """The crop rule written out: the image averaged over 2^level blocks, then one
    bilinear sample per output pixel at its centre (pixel centres at integers + 0.5)."""
    k = 2 ** level
    src = F.avg_pool2d(x, k) if k > 1 else x
    H, W = src.shape[-2:]
    # centre of output pixel j in the level's pixel coordinates, minus 0.5: index units
    xs = (x0 + (torch.arange(size) + 0.5) * (x1 - x0) / size) / k - 0.5
    ys = (y0 + (torch.arange(size) + 0.5) * (y1 - y0) / size) / k - 0.5
    xs, ys = xs.clamp(0, W - 1), ys.clamp(0, H - 1)
    xa, ya = xs.floor().long().clamp(max=W - 2), ys.floor().long().clamp(max=H - 2)
    fx, fy = xs - xa, ys - ya
    rows = src[..., ya, :] * (1 - fy)[:, None] + src[..., ya + 1, :] * fy[:, None]
    return rows[..., xa] * (1 - fx) + rows[..., xa + 1] * fx


def test_cut_crops_level0_is_roi_align_and_levels_average_blocks():
    from torchvision.ops import roi_align

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 100, 120, generator=gen)
    # crops no larger than the output: one bilinear sample per pixel, as roi_align's
    rois = torch.tensor([[0, 10, 20, 74, 84], [1, 0, 0, 64, 64], [1, 10.5, 3.2, 50, 40]])
    torch.testing.assert_close(cut_crops(x, rois, (64, 64)),
                               roi_align(x, rois, (64, 64), 1.0, 1, aligned=True),
                               atol=1e-4, rtol=0)
    # an exact 2x / 4x downscale of an aligned box is the mean of 2x2 / 4x4 blocks
    big = torch.randn(1, 3, 128, 128, generator=gen)
    whole = torch.tensor([[0, 0, 0, 128, 128.0]])
    torch.testing.assert_close(cut_crops(big, whole, (64, 64)), F.avg_pool2d(big, 2))
    torch.testing.assert_close(cut_crops(big, whole, (32, 32)), F.avg_pool2d(big, 4))
    assert cut_crops(big, torch.zeros(0, 5), (8, 8)).shape == (0, 3, 8, 8)


def test_crop_regions_equal_manual_crops(vit):
    img = _image(256, 256)
    # a 192 px box: the 1x crop is a 3x downscale; the 1.5x box [0, 0, 288, 288] is
    # clipped at the right and bottom borders to [0, 0, 256, 256]: a 4x downscale.
    # A 3x downscale samples the 2x2-averaged image, a 4x one the 4x4-averaged image.
    boxes = torch.tensor([[48.0, 48, 240, 240]])
    got = vit.regions(img, boxes)
    x = _norm_image(vit, img)[None]
    with torch.no_grad():
        c1 = _manual_crop(x, 48, 48, 240, 240, level=1)
        c2 = _manual_crop(x, 0, 0, 256, 256, level=2)
        e = F.normalize(vit.model.encode_image(torch.cat([c1, c2])), dim=-1)
        want = F.normalize(e.sum(0), dim=0)
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    # the second scale matters; at scale 1 a 64 px box is the crop itself, a 128 px box
    # its 2x bilinear downscale
    one = Teacher(vit.model, "tiny_vit", crop_scales=[1.0])
    boxes = torch.tensor([[48.0, 48, 240, 240], [32, 96, 96, 160], [100, 10, 228, 138]])
    only1 = one.regions(img, boxes)
    assert (only1[0] - got[0]).abs().max() > 1e-3
    with torch.no_grad():
        c3 = F.interpolate(x[:, :, 10:138, 100:228], size=(64, 64), mode="bilinear",
                           align_corners=False)
        want = F.normalize(vit.model.encode_image(torch.cat([x[:, :, 96:160, 32:96], c3])), dim=-1)
    torch.testing.assert_close(only1[1:], want, atol=1e-5, rtol=1e-5)


def test_crop_regions_batched_equals_single(vit):
    small, big = _image(96, 80, seed=1), _image(160, 160, seed=2)
    bs = torch.tensor([[40.0, 50, 80, 96], [3, 4, 30, 33]])  # first touches small's corner
    bb = torch.tensor([[100.0, 100, 160, 150]])
    a, b = vit.regions([small, big], [bs, bb])
    one = Teacher(vit.model, "tiny_vit", batch_size=3)  # crops split over encoder batches
    torch.testing.assert_close(a, one.regions(small, bs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, one.regions(big, bb), atol=1e-5, rtol=1e-5)
    assert a.shape == (2, 128) and torch.allclose(a.norm(dim=-1), torch.ones(2))
    e, f = vit.regions([small, big], [torch.zeros(0, 4), bb])
    assert e.shape == (0, 128) and torch.allclose(f, b, atol=1e-5)
    assert vit.regions(small, torch.zeros(0, 4)).shape == (0, 128)
    loss = (torch.randn(2, 128, requires_grad=True) - a).abs().sum()  # usable loss target
    loss.backward()


# --------------------------------------------------------------------------- dense


def _ln(m: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _manual_vit_dense(visual, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Step by step with plain torch ops; x (1, 3, H, W) normalised -> (D, h, w)."""
    p = visual.patch_size[0]
    t = F.conv2d(x, visual.conv1.weight, stride=p)  # (1, C, gh, gw)
    gh, gw = t.shape[-2:]
    c = t.shape[1]
    t = t.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g0 = visual.grid_size
    if (gh, gw) != tuple(g0):
        grid = pos[1:].reshape(1, g0[0], g0[1], c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False,
                             antialias=True)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, c)])
    t = torch.cat([visual.class_embedding.view(1, 1, c), t], dim=1) + pos
    t = _ln(visual.ln_pre, t)
    for blk in visual.transformer.resblocks[:-1]:
        t = blk(t)
    last = visual.transformer.resblocks[-1]
    y = _ln(last.ln_1, t)
    q, k, v = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
    out = F.linear(v, last.attn.out_proj.weight, last.attn.out_proj.bias)
    g1 = getattr(last.ls_1, "gamma", torch.ones(c))
    g2 = getattr(last.ls_2, "gamma", torch.ones(c))
    if mode == "maskclip":
        t = t + g1 * out
        h = _ln(last.ln_2, t)
        h = F.linear(F.gelu(F.linear(h, last.mlp.c_fc.weight, last.mlp.c_fc.bias)),
                     last.mlp.c_proj.weight, last.mlp.c_proj.bias)
        t = t + g2 * h
    else:
        t = out
    t = _ln(visual.ln_post, t) @ visual.proj  # (1, 1 + gh*gw, D)
    return F.normalize(t[0, 1:], dim=-1).T.reshape(-1, gh, gw)


@pytest.mark.parametrize("mode", ["maskclip", "clearclip"])
def test_vit_dense_equals_manual(vit, mode):
    t = Teacher(vit.model, "tiny_vit", dense_mode=mode)
    for h, w in ((64, 64), (96, 80)):  # native grid, and an interpolated 12x10 grid
        img = _image(h, w, seed=h)
        got = t.dense(img)
        assert got.shape == (128, h // 8, w // 8)
        with torch.no_grad():
            want = _manual_vit_dense(vit.model.visual, _norm_image(vit, img)[None], mode)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_vit_dense_with_layer_scale(tmp_path):
    cfg = json.loads((CONFIGS / "tiny_vit.json").read_text())
    cfg["vision_cfg"].update(layers=2, width=64, ls_init_value=0.5)
    path = tmp_path / "tiny_vit_ls.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    t = build_teacher(model="tiny_vit_ls", model_config=str(path))
    with torch.no_grad():  # non-trivial layer-scale gammas
        for blk in t.model.visual.transformer.resblocks:
            blk.ls_1.gamma.uniform_(0.2, 2.0)
            blk.ls_2.gamma.uniform_(0.2, 2.0)
    img = _image(64, 64, seed=3)
    with torch.no_grad():
        want = _manual_vit_dense(t.model.visual, _norm_image(t, img)[None], "maskclip")
    torch.testing.assert_close(t.dense(img), want, atol=1e-4, rtol=1e-4)


def test_maskclip_is_self_only_attention(vit):
    """MaskCLIP's last block == open_clip's own block with each token attending only to
    itself; the last block's queries and keys play no part."""
    img = _image(64, 64, seed=5)
    got = vit.dense(img)
    visual = vit.model.visual
    with torch.no_grad():
        inter = visual.forward_intermediates(_norm_image(vit, img)[None], indices=[2],
                                             intermediates_only=True,
                                             output_extra_tokens=True)
        tokens = torch.cat([inter["image_intermediates_prefix"][0],
                            inter["image_intermediates"][0].flatten(2).transpose(1, 2)], 1)
        n = tokens.shape[1]
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0)
        t = visual.transformer.resblocks[-1](tokens, attn_mask=mask)
        want = F.normalize(visual.ln_post(t[0, 1:]) @ visual.proj, dim=-1).T.reshape(-1, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # perturbing the last block's q/k weights changes encode_image but not the dense map
    model = open_clip.create_model("tiny_vit")
    model.load_state_dict(vit.model.state_dict())
    with torch.no_grad():
        model.visual.transformer.resblocks[-1].attn.in_proj_weight[:256].normal_(0, 0.5)
    t2 = Teacher(model, "tiny_vit")
    torch.testing.assert_close(t2.dense(img), got, atol=1e-5, rtol=1e-5)
    x = _norm_image(vit, img)[None]
    with torch.no_grad():
        diff = (model.encode_image(x) - vit.model.encode_image(x)).abs().max().item()
    assert diff > 1e-3
    clear = Teacher(vit.model, "tiny_vit", dense_mode="clearclip").dense(img)
    assert (clear - got).abs().max() > 1e-2


def test_resnet_dense_equals_1x1_convs(rn):
    img = _image(64, 96, seed=7)
    got = rn.dense(img)
    assert got.shape == (128, 2, 3)
    visual = rn.model.visual
    with torch.no_grad():
        t = visual.stem(_norm_image(rn, img)[None])
        t = visual.layer4(visual.layer3(visual.layer2(visual.layer1(t))))[0]  # (1024, 2, 3)
        ap = visual.attnpool
        v = torch.einsum("oc,chw->ohw", ap.v_proj.weight, t) + ap.v_proj.bias[:, None, None]
        o = torch.einsum("oc,chw->ohw", ap.c_proj.weight, v) + ap.c_proj.bias[:, None, None]
    torch.testing.assert_close(got, F.normalize(o, dim=0), atol=1e-4, rtol=1e-4)
    assert rn.dense(_image(80, 40)).shape == (128, 2, 1)  # rounded to multiples of 32


def test_dense_regions(vit, rn):
    img = _image(64, 96, seed=9)
    fmap = vit.dense(img)  # (128, 8, 12), no resize: sides are multiples of 8
    boxes = torch.tensor([[16.0, 8, 24, 16], [0, 0, 16, 16], [10, 3, 90, 60]])
    got = vit.regions(img, boxes, mode="dense")
    assert got.shape == (3, 128)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(got[0], fmap[:, 1, 2], atol=1e-5, rtol=1e-5)  # one cell
    torch.testing.assert_close(got[1], F.normalize(fmap[:, :2, :2].mean((1, 2)), dim=0),
                               atol=1e-5, rtol=1e-5)  # 2x2 cells
    outside = vit.regions(img, torch.tensor([[-20.0, -5, 16, 16], [80, 40, 150, 90]]), mode="dense")
    torch.testing.assert_close(outside[0], got[1], atol=1e-5, rtol=1e-5)  # clipped to the image
    torch.testing.assert_close(outside[1], F.normalize(fmap[:, 5:, 10:].mean((1, 2)), dim=0),
                               atol=1e-5, rtol=1e-5)
    assert vit.dense(_image(100, 75)).shape == (128, 12, 9)
    r = rn.regions([img, _image(40, 40)], [boxes, boxes[:1]], mode="dense")
    assert [x.shape for x in r] == [(3, 128), (1, 128)]


# --------------------------------------------------------------------------- loading


def test_load_checkpoint_file(vit, tmp_path):
    sd = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    torch.save(sd, tmp_path / "tiny.pt")
    x = _norm_image(vit, _image(64, 64))[None]
    with torch.no_grad():
        want = vit.model.encode_image(x)
    for name in ("tiny.safetensors", "tiny.pt"):
        path = str(tmp_path / name)
        loaded = _build("tiny_vit", seed=123, pretrained=path, templates="shapes")
        direct = open_clip.create_model("tiny_vit", pretrained=path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.encode_image(x), want)
            torch.testing.assert_close(direct.encode_image(x), want)
        assert loaded.fingerprint == vit.fingerprint
    torch.testing.assert_close(loaded.text(NAMES), vit.text(NAMES))
    assert Teacher(vit.model, "tiny_vit", templates="shapes").fingerprint == vit.fingerprint
    # other weights, other fingerprint; so do other templates / crop rule / dense mode
    other = open_clip.create_model("tiny_vit")  # random init, other weights
    assert Teacher(other, "tiny_vit", templates="shapes").fingerprint != vit.fingerprint
    assert Teacher(vit.model, "tiny_vit", templates="vild").fingerprint != vit.fingerprint
    assert Teacher(vit.model, "tiny_vit", templates="shapes",
                   crop_scales=[1.0, 2.0]).fingerprint != vit.fingerprint
    assert Teacher(vit.model, "tiny_vit", templates="shapes",
                   dense_mode="clearclip").fingerprint != vit.fingerprint
    assert len(vit.fingerprint) == 16 and int(vit.fingerprint, 16) >= 0


def test_from_config_frozen_and_eval(tmp_path):
    cfg = TeacherConfig(model="tiny_rn", model_config=str(CONFIGS / "tiny_rn.json"),
                        templates="simple", crop_scales=[1.0], batch_size=4)
    t = Teacher.from_config(cfg)
    assert (t.embed_dim, t.image_size, t.crop_scales, t.batch_size) == (128, (64, 64), (1.0,), 4)
    assert t.templates == TEMPLATE_SETS["simple"]
    assert t.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    # BatchNorm running stats must not move when embedding (eval mode)
    before = t.model.visual.bn1.running_mean.clone()
    t.regions(_image(64, 64), torch.tensor([[0.0, 0, 32, 32]]))
    torch.testing.assert_close(t.model.visual.bn1.running_mean, before)


def test_errors(vit, tmp_path):
    def one_line(exc):
        assert "\n" not in str(exc.value)
        return str(exc.value)

    with pytest.raises(TeacherError) as e:
        build_teacher(model="tiny_vitt")
    assert "unknown open_clip model 'tiny_vitt'" in one_line(e) and "tiny_vit" in str(e.value)
    with pytest.raises(TeacherError) as e:
        build_teacher(model="tiny_vit", pretrained=str(tmp_path / "missing.safetensors"))
    assert "not found" in one_line(e) and "missing.safetensors" in str(e.value)
    with pytest.raises(TeacherError) as e:
        build_teacher(model="tiny_vit", pretrained="laion9b")
    assert "neither a file nor a tag" in one_line(e)
    with pytest.raises(TeacherError) as e:
        build_teacher(model="tiny_vit", model_config=str(tmp_path / "nope.json"))
    assert "model_config not found" in one_line(e)
    with pytest.raises(TeacherError) as e:
        build_teacher(model="ViT-B-32", model_config=str(CONFIGS / "tiny_vit.json"))
    assert "file stem 'tiny_vit'" in one_line(e)
    with pytest.raises(TeacherError) as e:  # weights that don't fit
        path = tmp_path / "small.safetensors"
        sd = {k: v.contiguous() for k, v in vit.model.state_dict().items()
              if not k.startswith("visual.transformer.resblocks.3")}
        sd["visual.proj"] = torch.zeros(128, 64)
        sd["extra.weight"] = torch.zeros(1)
        save_file(sd, str(path))
        build_teacher(model="tiny_vit", pretrained=str(path))
    assert one_line(e).startswith(f"cannot load pretrained '{path}' into 'tiny_vit': weights do "
                                  "not fit: 12 missing keys (e.g. visual.transformer.resblocks.3")
    assert "1 unexpected keys (e.g. extra.weight)" in str(e.value)
    assert ("1 shape mismatches (e.g. visual.proj: checkpoint [128, 64], model [128, 128])"
            in str(e.value))
    with pytest.raises(TeacherError, match="region_mode"):
        Teacher(vit.model, "tiny_vit", region_mode="box")
    with pytest.raises(TeacherError, match="dense_mode"):
        Teacher(vit.model, "tiny_vit", dense_mode="mask")
    with pytest.raises(TeacherError, match="unknown teacher option"):
        build_teacher(model="tiny_vit", crop_scale=[1.0])
    assert issubclass(TeacherError, ConfigError)


def test_dense_short_side_scales_the_dense_input(tmp_path):
    from distill.teacher import build_teacher

    cfg = str(Path(__file__).resolve().parents[1] / "configs/shapes/teacher/tiny_vit.json")
    torch.manual_seed(0)
    own = build_teacher("tiny_vit", model_config=cfg)
    torch.manual_seed(0)
    short = build_teacher("tiny_vit", model_config=cfg, dense_short_side=64)
    assert own.dense_size(480, 640) == (480, 640)
    assert short.dense_size(480, 640) == (64, 88)  # 85.3 rounded to the patch size 8
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    assert short.dense(image).shape == (128, 8, 11)
    assert own.fingerprint != short.fingerprint


def test_dense_keys_are_the_last_attention_keys(vit, rn):
    img = _image(64, 96, seed=3)
    keys = vit.dense(img, keys=True)
    assert keys.shape[-2:] == vit.dense(img).shape[-2:]
    with torch.no_grad():  # the manual ViT path up to the last block, then its key projection
        visual = vit.model.visual
        x = _norm_image(vit, img)[None]
        t = visual.conv1(x)
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        from distill.teacher.dense import interpolate_pos_embed
        t = torch.cat([visual.class_embedding.view(1, 1, -1), t], 1)
        t = _ln(visual.ln_pre, t + interpolate_pos_embed(visual, (gh, gw)))
        for blk in visual.transformer.resblocks[:-1]:
            t = blk(t)
        last = visual.transformer.resblocks[-1]
        k = F.linear(_ln(last.ln_1, t), last.attn.in_proj_weight, last.attn.in_proj_bias)
        k = k.chunk(3, dim=-1)[1][0, 1:].T.reshape(-1, gh, gw)
    torch.testing.assert_close(keys, k, atol=1e-4, rtol=1e-4)
    rk = rn.dense(img, keys=True)
    assert rk.shape == (rn.model.visual.attnpool.k_proj.out_features, 2, 3)
    # one pass of the tower gives both (a MaskCLIP+ training batch with key smoothing)
    for teacher, want in ((vit, keys), (rn, rk)):
        for batch in (img, img[None]):
            dense, both = teacher.dense(batch, with_keys=True)
            assert torch.equal(dense, teacher.dense(batch))
            assert torch.equal(both, want if batch.dim() == 3 else want[None])


def test_prompt_denoising_drops_classes_never_confident():
    from distill.teacher.dense import refine_logits

    # 3 classes on a 1 x 2 grid; class 2 never exceeds softmax 0.3, class 1 reaches 0.6
    logits = torch.log(torch.tensor([[0.5, 0.2], [0.2, 0.6], [0.3, 0.2]])).view(1, 3, 1, 2)
    out = refine_logits(logits, prompt_denoising=0.5)
    assert (out[0, 2] == -1e4).all()
    torch.testing.assert_close(out[0, :2], logits[0, :2])
    # no class confident anywhere: the most confident one (class 0, 0.4) survives
    flat = torch.log(torch.tensor([[0.4, 0.3], [0.3, 0.4], [0.3, 0.3]])).view(1, 3, 1, 2)
    kept = refine_logits(flat, prompt_denoising=0.9)[0]
    assert (kept[0] == flat[0, 0]).all() and (kept[1:] == -1e4).all()


def test_key_smoothing_hand_computed():
    from distill.teacher.dense import refine_logits

    # 2 classes, 3 locations; keys: locations 0 and 1 point the same way, 2 is orthogonal
    p = torch.tensor([[0.9, 0.3, 0.6], [0.1, 0.7, 0.4]])
    logits = p.log().view(1, 2, 1, 3)
    keys = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    out = refine_logits(logits, keys, key_smoothing=0.95).softmax(1)[0, :, 0]
    # location 0 (top 0.9 < 0.95) and 1 average each other; 2 only sees itself
    want = torch.tensor([[0.6, 0.6, 0.6], [0.4, 0.4, 0.4]])
    torch.testing.assert_close(out, want)
    # a threshold below a location's confidence leaves it alone (location 0: 0.9)
    out = refine_logits(logits, keys, key_smoothing=0.8).softmax(1)[0, :, 0]
    torch.testing.assert_close(out[:, 0], p[:, 0])
    torch.testing.assert_close(out[:, 1], torch.tensor([0.6, 0.4]))
    with pytest.raises(ValueError, match="keys"):
        refine_logits(logits, None, key_smoothing=1.0)


def _reference_refine(cos: np.ndarray, keys: np.ndarray, ks: float, pd: float) -> np.ndarray:
    """MaskCLIP's ``refine_output`` (chongzhou96/MaskCLIP, maskclip_head.py) written out in
    numpy for one image: ``cos`` (C, N) text-pixel cosines, ``keys`` (K, N). Prompt
    denoising: a class whose softmax(100 cos) stays below ``pd`` at every location gets
    -100; key smoothing: the output becomes softmax(100 x) over classes, and a location whose
    top probability is below ``ks`` takes sum_j cos(k_i, k_j) p_j. Returns that output."""
    out = cos.copy()

    def softmax(x):
        e = np.exp(x - x.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    if pd > 0:
        out[softmax(out * 100).max(1) < pd] = -100
    p = softmax(out * 100)
    k = keys / np.linalg.norm(keys, axis=0, keepdims=True)
    weighted = p @ (k.T @ k).T
    unsure = p.max(0) < ks
    p[:, unsure] = weighted[:, unsure]
    return p


def test_key_smoothing_and_prompt_denoising_match_maskclips_definitions():
    """refine_logits against the reference's refine_output on a hand-made image (3 classes,
    4 locations, keys at non-negative cosines): the same labels, and at the smoothed
    locations the reference's weighted sums divided by their total over classes."""
    from distill.teacher.dense import refine_logits

    cos = np.array([[0.30, 0.26, 0.21, 0.20],   # class 0: confident at location 0 only
                    [0.20, 0.25, 0.22, 0.21],
                    [0.10, 0.11, 0.12, 0.11]])  # class 2: never above 0.5: denoised
    keys = np.array([[1.0, 0.9, 0.2, 0.0],
                     [0.0, 0.4, 1.0, 1.0]])
    want = _reference_refine(cos, keys, ks=1.0, pd=0.5)
    logits = torch.tensor(cos, dtype=torch.float32).view(1, 3, 1, 4) / 0.01
    got = refine_logits(logits, torch.tensor(keys, dtype=torch.float32).view(1, 2, 1, 4),
                        key_smoothing=1.0, prompt_denoising=0.5)
    assert got[0, :, 0].argmax(0).tolist() == want.argmax(0).tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(got[0, :, 0].softmax(0).numpy(), want / want.sum(0),
                               rtol=1e-5, atol=1e-6)
    # the two departures (docs/reproduce.md section 6): a negative key cosine counts as 0
    # here (the reference subtracts), and when no class reaches the denoising threshold the
    # image's most confident class is kept (the reference masks every class)
    flat = torch.zeros(1, 3, 1, 4)
    assert (refine_logits(flat, prompt_denoising=0.5)[0, 0] == 0).all()
