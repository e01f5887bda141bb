"""detectron2 model-zoo checkpoints (numpy pickles) into the students' ResNet backbones, and
the DatasetCatalog registration (skipped: detectron2 cannot be installed here)."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet

from distill.backbones import resnet_fpn
from distill.detectron2 import (
    IMAGENET_STD,
    Detectron2CheckpointError,
    read_pickle,
    register_datasets,
)


def _source(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision ResNet-18 state_dict with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = resnet.resnet18(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.state_dict()


def _to_d2(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    """torchvision names -> detectron2's, written out by hand for the test."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        k = k.replace("conv1.weight", "stem.conv1.weight", 1) if k == "conv1.weight" else k
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
        if m:
            stage, block, rest = int(m[1]) + 1, m[2], m[3]
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
            k = f"res{stage}.{block}.{rest}"
        out[prefix + k] = v.numpy().copy()
    return out


def _write(path, model: dict, author: str = "torchvision", key: str = "model"):
    with open(path, "wb") as f:
        pickle.dump({key: model, "__author__": author, "matching_heuristics": True}, f)
    return path


def _body(net) -> dict[str, torch.Tensor]:
    return {k.removeprefix("body."): v for k, v in net.state_dict().items() if k.startswith("body.")}


@pytest.mark.parametrize("prefix", ["", "backbone.bottom_up."])
def test_detectron2_names_load_into_the_backbone(tmp_path, prefix):
    src = _source()
    path = _write(tmp_path / "R-18.pkl", _to_d2(src, prefix))
    net = resnet_fpn(18, norm="frozen_bn", weights=str(path))
    got = _body(net)
    for k, v in src.items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[k], v, msg=k)


def test_caffe2_msra_names_and_input_convention(tmp_path):
    """MSRA's Caffe2 names (scale/bias-only frozen BN), BGR 0-255 input: the converted stem
    gives on our normalised RGB input what the original gives on detectron2's input."""
    src = _source(1)
    c2 = {"conv1_w": src["conv1.weight"], "res_conv1_bn_s": src["bn1.weight"],
          "res_conv1_bn_b": src["bn1.bias"]}
    for k, v in src.items():
        m = re.match(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(weight|bias)$", k)
        if m:
            branch = {"1": "2a", "2": "2b", "3": "2c"}[m[4]]
            leaf = "w" if m[3] == "conv" else {"weight": "bn_s", "bias": "bn_b"}[m[5]]
            c2[f"res{int(m[1]) + 1}_{m[2]}_branch{branch}_{leaf}"] = v
        m = re.match(r"^layer(\d)\.(\d+)\.downsample\.(\d)\.(weight|bias)$", k)
        if m:
            leaf = "w" if m[3] == "0" else {"weight": "bn_s", "bias": "bn_b"}[m[4]]
            c2[f"res{int(m[1]) + 1}_{m[2]}_branch1_{leaf}"] = v
    path = _write(tmp_path / "R-18-msra.pkl", {k: v.numpy() for k, v in c2.items()},
                  author="Detectron", key="blobs")
    net = resnet_fpn(18, norm="frozen_bn", weights=str(path))
    body = net.body.eval()
    torch.testing.assert_close(body.layer2[0].bn1.weight * (body.layer2[0].bn1.running_var
                                                           + 1e-5).rsqrt(),
                               src["layer2.0.bn1.weight"])  # scale-only BN kept as is
    torch.testing.assert_close(body.layer2[0].bn1.bias, src["layer2.0.bn1.bias"])
    rgb = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor(IMAGENET_STD)
    ours = F.conv2d((rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), body.conv1.weight,
                    stride=2, padding=3)
    bgr255 = (rgb * 255 - 255 * mean.view(1, 3, 1, 1)).flip(1)  # detectron2's input
    theirs = F.conv2d(bgr255, src["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


def test_a_pickle_with_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"model": {"conv1_w": Evil()}}))
    with pytest.raises(Detectron2CheckpointError, match=r"R-50.pkl: .*refusing to load "
                                                         r"(posix|os)\.system"):
        read_pickle(path)
    with pytest.raises(ValueError, match="refusing"):
        resnet_fpn(18, norm="frozen_bn", weights=str(path))
    assert not marker.exists()


def test_wrong_depth_or_not_a_backbone_is_one_line(tmp_path):
    path = _write(tmp_path / "R-18.pkl", _to_d2(_source()))
    with pytest.raises(ValueError, match=r"R-18.pkl: not weights of this ResNet \(\d+ tensors "
                                         r"of another shape, e.g. layer1.0.conv1.weight"):
        resnet_fpn(50, norm="frozen_bn", weights=str(path))
    partial = {k: v for k, v in _to_d2(_source()).items() if not k.startswith("res5.")}
    with pytest.raises(ValueError, match=r"not weights of this ResNet \(\d+ tensors missing, "
                                         r"e.g. \['layer4"):
        resnet_fpn(18, norm="frozen_bn", weights=str(_write(tmp_path / "part.pkl", partial)))
    head = _write(tmp_path / "head.pkl", {"roi_heads.box_predictor.weight": np.zeros((2, 2))})
    with pytest.raises(Detectron2CheckpointError, match="no ResNet stem"):
        resnet_fpn(18, norm="frozen_bn", weights=str(head))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pickle(tmp_path / "absent.pkl")


def test_datasetcatalog_registration_needs_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="detectron2 is not installed"):
            register_datasets()
        pytest.skip("detectron2 is not installed (not on PyPI; see issue 9): registration "
                    "itself untested here")


def test_torchvision_state_dict_loads_and_a_mismatched_norm_is_refused(tmp_path):
    src = _source(2)
    path = tmp_path / "resnet18.pth"
    torch.save(src, path)
    got = _body(resnet_fpn(18, norm="frozen_bn", weights=str(path)))
    torch.testing.assert_close(got["layer3.1.bn2.running_var"], src["layer3.1.bn2.running_var"])
    # GroupNorm has no running statistics: the BN file does not fit, and says so
    with pytest.raises(ValueError, match=r"resnet18.pth: not weights of this ResNet"):
        resnet_fpn(18, norm="gn", weights=str(path))
