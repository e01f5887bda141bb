"""detectors/few_names.py: the subsets and the count of detections on unnamed objects."""

import torch

from detectors.few_names import on_objects, subsets


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
