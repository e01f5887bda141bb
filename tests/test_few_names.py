"""detectors/few_names.py and segmentors/few_names.py: the subsets, the count of
detections on unnamed objects and the segmentation measure."""

import pytest
import torch

from detectors.few_names import on_objects
from distill.data.vocab import subsets


def test_subsets_cover_every_class_in_groups_of_three():
    groups = subsets(16, 3, rounds=2, seed=0)
    assert len(groups) == 2 * 6 and all(len(g) == len(set(g)) == 3 for g in groups)
    for r in range(2):  # each round is a partition, its last group filled from the others
        round_groups = groups[6 * r:6 * r + 6]
        assert set().union(*map(set, round_groups)) == set(range(16))
        assert sum(len(g) for g in round_groups) == 18
    assert subsets(16, 3, 2, seed=0) == groups and subsets(16, 3, 2, seed=1) != groups


def test_detections_on_unnamed_objects_by_hand():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float)
    classes = torch.tensor([0, 5, 7])
    boxes = torch.tensor([[0, 0, 10, 9],      # on object 0 (IoU 0.9): class 0, named
                          [21, 20, 30, 30],   # on object 1 (IoU 0.9): class 5, unnamed
                          [40, 40, 46, 50],   # on object 2 (IoU 0.6): class 7, unnamed
                          [40, 40, 44, 50],   # IoU 0.4: on no object
                          [60, 60, 70, 70]],  # on nothing
                         dtype=torch.float)
    assert on_objects(boxes, gt, classes, [0, 3, 9]) == (2, 1)
    assert on_objects(boxes, gt, classes, [0, 5, 7]) == (0, 3)
    assert on_objects(boxes[:0], gt, classes, [0]) == (0, 0)
    assert on_objects(boxes, gt[:0], classes[:0], [0]) == (0, 0)


class _FixedScores(torch.nn.Module):
    """A stand-in segmenter whose name scores for every image are ``scores`` (C, H, W)."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.unused = scores, torch.nn.Parameter(torch.zeros(1))
        self.text_embeddings = torch.zeros(0, 2)

    def set_vocabulary(self, text):
        self.text_embeddings = text

    def score_logits(self, images):
        return self.scores[None].expand(len(images), -1, -1, -1)

    def name_scores(self, logits):
        return logits


def test_segmentation_few_names_by_hand():
    """4 classes, one pixel each (ground truth 0..3), names in pairs: the subsets of seed 0 are
    {0, 2} and {1, 3}; IoUs, unnamed pixels painted and the best cut worked out by hand."""
    from types import SimpleNamespace

    from segmentors.few_names import few_names

    assert subsets(4, 2, 1, seed=0) == [[0, 2], [1, 3]]
    scores = torch.tensor([[0.9, 0.05, 0.03, 0.02],    # pixel of class 0
                           [0.3, 0.6, 0.05, 0.05],     # class 1
                           [0.1, 0.1, 0.75, 0.05],     # class 2
                           [0.05, 0.05, 0.7, 0.2]]).T  # class 3
    sample = {"image": torch.zeros(3, 1, 4, dtype=torch.uint8),
              "labels": torch.tensor([[0, 1, 2, 3]]), "file_name": "x.png"}
    data = type("Data", (), {"classes": ["a", "b", "c", "d"], "__len__": lambda s: 1,
                             "__getitem__": lambda s, i: sample})()
    model = _FixedScores(scores[:, None, :])
    seg = SimpleNamespace(short_side=0, window=0, stride=0)
    m = few_names(model, data, torch.eye(4, 2), seg, thresholds=[0.0, 0.5], size=2, rounds=1,
                  progress=False)
    # every name: predictions 0, 1, 2, 2 -> IoU 1, 1, 1/2, 0
    assert m["all"] == pytest.approx(0.625)
    # {0, 2}: cut 0 paints pixels 1 and 3 with 0 and 2 (IoU 1/2 each); cut 0.5 leaves pixel 1
    # (0.3) clear (IoU of 0: 1). {1, 3}: cut 0 paints pixels 0 and 2 with 1 (IoU 1/3; 3: 1);
    # cut 0.5 keeps only pixel 1 (IoU of 1: 1, of 3: 0)
    assert m["by_threshold"][0.0]["few"] == pytest.approx((0.5 + 1 / 3 + 0.5 + 1) / 4)
    assert m["by_threshold"][0.5]["few"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert m["by_threshold"][0.0]["unnamed_painted"] == pytest.approx(1.0)
    assert m["by_threshold"][0.5]["unnamed_painted"] == pytest.approx(0.25)
    assert m["threshold"] == 0.5 and m["few"] == pytest.approx(0.625)
    assert m["per_class"] == {"a": {"all": 1.0, "few": 1.0}, "b": {"all": 1.0, "few": 1.0},
                              "c": {"all": 0.5, "few": 0.5}, "d": {"all": 0.0, "few": 0.0}}
    assert model.text_embeddings.shape == (0, 2)  # the vocabulary is restored
    # a large split: evenly spread images (here copies of the one) and pixels; two pixels of
    # four are the first and the last (classes 0 and 3, predicted 0 and 2): IoU 1, 0, 0
    many = type("Data", (), {"classes": ["a", "b", "c", "d"], "__len__": lambda s: 5,
                             "__getitem__": lambda s, i: sample})()
    again = few_names(model, many, torch.eye(4, 2), seg, thresholds=[0.0, 0.5], size=2,
                      rounds=1, max_images=1, progress=False)
    assert again == m
    two = few_names(model, data, torch.eye(4, 2), seg, size=2, rounds=1, max_pixels=2,
                    progress=False)
    assert two["all"] == pytest.approx(1 / 3)
