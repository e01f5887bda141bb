"""detectron2 checkpoints and datasets without detectron2.

Backbone weights from detectron2's model zoo are pickles of numpy arrays
(``R-50.pkl``: ``{"model": {name: ndarray}, "__author__": ...}``, or Detectron's
``{"blobs": {...}}``). :func:`read_pickle` opens them with an unpickler that admits
numpy arrays and plain containers only (anything else, e.g. ``os.system``, is refused
before it runs); :func:`torchvision_resnet_state_dict` renames them to torchvision's
ResNet keys, which ``distill.backbones.resnet_fpn`` loads for ``model.backbone_weights``
/ ``seg.backbone_weights`` ending in ``.pkl``. Two naming schemes are understood:

- detectron2's (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ``res2.0.shortcut``,
  optionally under ``backbone.bottom_up.``), as ``convert-torchvision-to-d2.py`` and
  detectron2 training runs write them;
- Caffe2's (MSRA ``R-50.pkl``: ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``,
  ``res2_0_branch1_bn_b``), whose frozen batch norms hold a scale and a bias only.

Input convention: torchvision-authored weights (``__author__ == "torchvision"``) expect
what the students feed, RGB in [0, 1] normalised by ImageNet mean/std. Every other
checkpoint (MSRA, Detectron) expects detectron2's default, BGR in [0, 255] minus the
pixel mean with std 1; the first convolution is then converted exactly: input channels
reversed to RGB and each multiplied by 255 x its ImageNet std (the pixel means are
255 x the ImageNet means, so the mean subtraction carries over).

``register_datasets()`` registers the OV-COCO / LVIS splits in detectron2's
``DatasetCatalog`` where detectron2 is installed.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

IMAGENET_STD = (0.229, 0.224, 0.225)  # RGB, as the students normalise
_FROZEN_BN_EPS = 1e-5  # torchvision FrozenBatchNorm2d: w * rsqrt(var + eps)

# (module, name) an R-50.pkl may reference: numpy's array reconstruction and containers
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class Detectron2CheckpointError(ValueError):
    """A detectron2 checkpoint cannot be used; the message is one line naming the file."""


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_pickle(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """(name -> array, author) of a detectron2 / Detectron ``.pkl`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 checkpoint not found: {path}")
    try:
        data = _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise Detectron2CheckpointError(f"{path}: not a detectron2 checkpoint of numpy arrays "
                                        f"({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, dict):
        raise Detectron2CheckpointError(f"{path}: top level is {type(data).__name__}, "
                                        "expected a dict")
    author = str(data.get("__author__", ""))
    weights = data.get("model", data.get("blobs", data))
    arrays = {k: v for k, v in weights.items() if isinstance(v, np.ndarray)}
    if not arrays:
        raise Detectron2CheckpointError(f"{path}: holds no numpy arrays")
    return arrays, author


_D2_STEM = re.compile(r"^stem\.conv1\.(weight|norm\.(weight|bias|running_mean|running_var))$")
_D2_BLOCK = re.compile(r"^res(\d)\.(\d+)\.(conv(\d)|shortcut)\.(weight|norm\."
                       r"(weight|bias|running_mean|running_var))$")
_C2_STEM = {"conv1_w": "conv1.weight", "res_conv1_bn_s": "bn1.weight",
            "res_conv1_bn_b": "bn1.bias"}
_C2_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b)$")


def _d2_name(name: str) -> str | None:
    name = name.removeprefix("backbone.bottom_up.")
    if m := _D2_STEM.match(name):
        return "conv1.weight" if m[1] == "weight" else f"bn1.{m[2]}"
    if m := _D2_BLOCK.match(name):
        stage, block, part, conv, leaf, norm = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}."
        if part == "shortcut":
            return prefix + ("downsample.0.weight" if leaf == "weight" else f"downsample.1.{norm}")
        return prefix + (f"conv{conv}.weight" if leaf == "weight" else f"bn{conv}.{norm}")
    return None


def _c2_name(name: str) -> str | None:
    if name in _C2_STEM:
        return _C2_STEM[name]
    if m := _C2_BLOCK.match(name):
        stage, block, branch, leaf = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}."
        if branch == "1":
            return prefix + {"w": "downsample.0.weight", "bn_s": "downsample.1.weight",
                             "bn_b": "downsample.1.bias"}[leaf]
        k = {"2a": 1, "2b": 2, "2c": 3}[branch]
        return prefix + {"w": f"conv{k}.weight", "bn_s": f"bn{k}.weight",
                         "bn_b": f"bn{k}.bias"}[leaf]
    return None


def torchvision_resnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A detectron2 / Caffe2 ResNet checkpoint as torchvision ResNet ``state_dict`` keys
    (``fc`` and non-backbone entries left out), in the students' input convention."""
    arrays, author = read_pickle(path)
    caffe2 = "conv1_w" in arrays
    rename = _c2_name if caffe2 else _d2_name
    out: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        key = rename(name)
        if key is not None:
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if "conv1.weight" not in out:
        raise Detectron2CheckpointError(f"{path}: no ResNet stem (conv1) in its "
                                        f"{len(arrays)} arrays; not a ResNet backbone checkpoint")
    if caffe2:  # scale/bias-only frozen batch norms: neutral running statistics
        for key in [k for k in out if k.endswith(".weight") and ("bn" in k or "downsample.1"
                                                                   in k)]:
            base = key[: -len("weight")]
            out.setdefault(base + "running_mean", torch.zeros_like(out[key]))
            out.setdefault(base + "running_var", torch.full_like(out[key], 1 - _FROZEN_BN_EPS))
    if author != "torchvision":  # BGR, 0-255, mean-subtracted -> RGB, ImageNet-normalised
        w = out["conv1.weight"].flip(1)
        out["conv1.weight"] = w * (255 * torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    return out


def register_datasets(names: tuple[str, ...] = ("coco_ov", "lvis")) -> list[str]:
    """Register each benchmark's train/val split in detectron2's DatasetCatalog and
    MetadataCatalog as ``ovd_<benchmark>_<split>`` (COCO-format files under the datasets
    root, distill/data/roots.py); returns the registered names. Needs detectron2."""
    try:
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.data.datasets import load_coco_json
    except ImportError:
        raise ImportError("detectron2 is not installed; ovdistill's own tools do not need it "
                          "(see docs/reproduce.md)") from None
    from distill.data.roots import detection_paths

    registered = []
    for bench in names:
        for split in ("train", "val"):
            name = f"ovd_{bench}_{split}"
            instances, images = detection_paths(bench, split)
            DatasetCatalog.register(name, lambda j=str(instances), i=str(images), n=name:
                                    load_coco_json(j, i, n))
            MetadataCatalog.get(name).set(json_file=str(instances), image_root=str(images),
                                          evaluator_type="lvis" if bench == "lvis" else "coco")
            registered.append(name)
    return registered
