"""BARON's bag-of-regions (distill/baron.py, distill.losses.bag_loss, Teacher.pseudo_text)
against hand computations and against open_clip's own text path."""

import math

import pytest
import torch
import torch.nn.functional as F

from detectors.criterion import DetectionCriterion
from distill.baron import (
    GRID,
    PseudoWords,
    bag_outputs,
    bag_seeds,
    cell_probabilities,
    drop_words,
    grid_boxes,
    neighbourhood_bags,
    pack_sentences,
    sample_bags,
    sine_positions,
)
from distill.config import ConfigError, load_config
from distill.losses import bag_loss
from distill.teacher import Teacher

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


@pytest.fixture(scope="module")
def teacher():
    return Teacher.from_config(load_config(REPO / "configs/shapes/vild.yaml").teacher)


# --------------------------------------------------------------------------- the loss


# student bags s0 = (1, 0), s1 = (0, 1); the teacher's enclosing boxes t0 = (0.6, 0.8), t1 = (0, 1)
S, T = ((1.0, 0.0), (0.0, 1.0)), ((0.6, 0.8), (0.0, 1.0))


def test_bag_loss_by_hand_in_batch():
    s = t(*S, grad=True)
    loss = bag_loss(s, t(*T), torch.tensor([0, 1]), torch.tensor([7, 7]), temperature=0.5)
    # student queries: s0 . [t0, t1] / 0.5 = [1.2, 0] (target 0); s1: [1.6, 2] (target 1)
    student = ((lse(1.2, 0.0) - 1.2) + (lse(1.6, 2.0) - 2.0)) / 2
    # teacher queries: t0 . [s0, s1] / 0.5 = [1.2, 1.6] (target 0); t1: [0, 2] (target 1)
    teacher = ((lse(1.2, 1.6) - 1.2) + (lse(0.0, 2.0) - 2.0)) / 2
    assert loss.item() == pytest.approx(0.5 * student + 0.5 * teacher, rel=1e-6)
    loss.backward()
    assert s.grad.abs().sum() > 0
    # two orders of the same boxes (one group) are not each other's negatives: nothing left
    same = bag_loss(t(*S), t(*T), torch.tensor([3, 3]), torch.tensor([7, 7]), temperature=0.5)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    # the default temperature is BARON's 1/30
    default = bag_loss(t(*S), t(*T), torch.tensor([0, 1]), torch.tensor([7, 7]))
    want = 0.25 * ((lse(18, 0) - 18) + (lse(24, 30) - 30) + (lse(18, 24) - 18) + (lse(0, 30) - 30))
    assert default.item() == pytest.approx(want, rel=1e-5)


def test_bag_loss_by_hand_with_queues_skipping_the_same_image():
    teacher_queue = t((1.0, 0.0, 7.0), (0.0, 1.0, 9.0))  # rows [embedding, image id]
    student_queue = t((0.6, 0.8, 9.0))
    loss = bag_loss(t(*S), t(*T), torch.tensor([0, 1]), torch.tensor([7, 7]),
                    student_queue, teacher_queue, temperature=0.5)
    # student queries add the queued teacher bag of image 9 (that of image 7 is their own):
    # s0 [1.2, 0, 0], s1 [1.6, 2, 2]; teacher queries add the queued student bag (0.6, 0.8):
    # t0 [1.2, 1.6, 2], t1 [0, 2, 1.6]
    student = ((lse(1.2, 0.0, 0.0) - 1.2) + (lse(1.6, 2.0, 2.0) - 2.0)) / 2
    teacher = ((lse(1.2, 1.6, 2.0) - 1.2) + (lse(0.0, 2.0, 1.6) - 2.0)) / 2
    assert loss.item() == pytest.approx(0.5 * student + 0.5 * teacher, rel=1e-6)
    empty = bag_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2),
                     torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.item() == 0.0 and empty.requires_grad


def test_criterion_queues_each_steps_bags_with_their_image():
    crit = DetectionCriterion({"vild_text": 0.0, "box_reg": 0.0, "vild_image": 0.0, "objectness": 0.0,
                      "rpn_box_reg": 0.0, "bag": 2.0}, bag_queue=3, bag_temperature=0.5)
    s = t(*S, grad=True)
    step = {"bag_embeddings": s, "bag_targets": t(*T), "bag_groups": torch.tensor([0, 1]),
            "bag_image_ids": torch.tensor([7.0, 7.0])}
    losses = crit(step)
    assert set(losses) == {"loss_bag"}
    first = bag_loss(t(*S), t(*T), torch.tensor([0, 1]), torch.tensor([7, 7]), temperature=0.5)
    assert losses["loss_bag"].item() == pytest.approx(2 * first.item(), rel=1e-6)
    assert crit.student_bags.contents().tolist() == [[1, 0, 7], [0, 1, 7]]
    assert crit.teacher_bags.contents().flatten().tolist() == pytest.approx([0.6, 0.8, 7, 0, 1, 7])
    losses["loss_bag"].backward()  # queueing after the loss leaves its graph intact
    assert s.grad.abs().sum() > 0
    # image 9's bags next: the queued bags of image 7 are its negatives
    nine = {**step, "bag_image_ids": torch.tensor([9.0, 9.0])}
    want = bag_loss(t(*S), t(*T), torch.tensor([0, 1]), torch.tensor([9, 9]),
                    t((1, 0, 7), (0, 1, 7)), t((0.6, 0.8, 7), (0, 1, 7)), temperature=0.5)
    assert crit(nine)["loss_bag"].item() == pytest.approx(2 * want.item(), rel=1e-6)
    assert len(crit.student_bags) == 3  # the oldest fell out
    crit.eval()
    before = crit.student_bags.contents().tolist()
    crit(nine)
    assert crit.student_bags.contents().tolist() == before  # evaluation queues nothing


# --------------------------------------------------------------------------- the bags


def test_grid_and_cell_probabilities_by_hand():
    grid = grid_boxes(torch.tensor([10.0, 20.0, 30.0, 60.0]))  # w 20, h 40; neighbours at 0.9
    assert grid[4].tolist() == [10, 20, 30, 60]
    assert grid[0].tolist() == pytest.approx([-8, -16, 12, 24])
    assert grid[5].tolist() == pytest.approx([28, 20, 48, 60])
    square = cell_probabilities(torch.tensor([40.0, 40.0, 60.0, 60.0]), 100, 100)
    assert square.tolist() == pytest.approx([0.3] * 4 + [1.0] + [0.3] * 4)
    # a tall box grows sideways: left / right 0.3 (0.3 x 4^3, capped), up / down 0.3 / 4^3,
    # corners their geometric mean
    tall = cell_probabilities(torch.tensor([45.0, 30.0, 55.0, 70.0]), 100, 100)
    side, up = 0.3, 0.3 / 64
    corner = math.sqrt(side * up)
    assert tall.tolist() == pytest.approx([corner, up, corner, side, 1, side, corner, up, corner])
    # 2 px from the left edge (0.1 of its width < cut-off 0.3 + interval -0.1): no left column
    edge = cell_probabilities(torch.tensor([2.0, 40.0, 22.0, 60.0]), 100, 100)
    assert edge[[0, 3, 6]].tolist() == [0, 0, 0] and edge[[2, 5, 8]].tolist() == pytest.approx([0.3] * 3)


def test_neighbourhood_groups_are_distinct_and_read_in_distinct_orders():
    g = torch.Generator().manual_seed(0)
    everything = neighbourhood_bags(torch.tensor([40.0, 40.0, 60.0, 60.0]), 100, 100, g,
                                    base_probability=1.0, alpha=0.0)
    assert len(everything) == 1  # every cell certain: one possible group, found once
    boxes, orders = everything[0]
    assert torch.equal(boxes, grid_boxes(torch.tensor([40.0, 40.0, 60.0, 60.0])))
    assert orders.shape == (2, 9) and not torch.equal(orders[0], orders[1])
    assert all(sorted(o.tolist()) == list(range(9)) for o in orders)
    edge = neighbourhood_bags(torch.tensor([2.0, 40.0, 22.0, 60.0]), 100, 100, g,
                              base_probability=1.0, alpha=0.0)
    assert len(edge) == 1 and len(edge[0][0]) == 6  # no left column
    groups = neighbourhood_bags(torch.tensor([40.0, 40.0, 60.0, 60.0]), 100, 100, g,
                                max_groups=3, max_permutations=2)
    keys = {tuple(sorted(map(tuple, b.tolist()))) for b, _ in groups}
    assert len(groups) == 3 and len(keys) == 3
    assert all([40.0, 40.0, 60.0, 60.0] in b.tolist() for b, _ in groups)  # the box itself


def test_sample_bags_structure_and_relative_positions():
    seeds = torch.tensor([[40.0, 40.0, 60.0, 60.0], [5.0, 70.0, 25.0, 95.0]])
    bags = sample_bags(seeds, 100, 120, torch.Generator().manual_seed(1), GRID)
    s = len(bags.members)
    assert bags.members.shape == (s, GRID) and bags.normed.shape == (s, GRID, 4)
    assert bags.group.max() == len(bags.spans) - 1
    assert (bags.boxes[:, 0::2] >= 0).all() and (bags.boxes[:, 0::2] <= 120).all()
    assert (bags.boxes[:, 1::2] >= 0).all() and (bags.boxes[:, 1::2] <= 100).all()
    for i in range(s):
        valid = bags.members[i] >= 0
        boxes, span = bags.boxes[bags.members[i][valid]], bags.spans[bags.group[i]]
        assert (bags.members[i][:int(valid.sum())] >= 0).all()  # left-aligned
        assert torch.allclose(torch.cat([boxes[:, :2].min(0).values, boxes[:, 2:].max(0).values]),
                              span)
        size = (span[2:] - span[:2]).repeat(2)
        assert torch.allclose(bags.normed[i][valid] * size + span[:2].repeat(2), boxes, atol=1e-4)
    # the orders of one group hold the same boxes
    for g in bags.group.unique():
        rows = [set(bags.members[i][bags.members[i] >= 0].tolist()) for i in range(s)
                if bags.group[i] == g]
        assert all(r == rows[0] for r in rows)
    again = sample_bags(seeds, 100, 120, torch.Generator().manual_seed(1), GRID)
    assert torch.equal(again.members, bags.members) and torch.equal(again.boxes, bags.boxes)
    none = sample_bags(torch.zeros(0, 4), 100, 120, None, GRID)
    assert none.members.shape == (0, GRID) and none.spans.shape == (0, 4)


def test_bag_seeds_filter_then_nms():
    boxes = torch.tensor([[10.0, 10, 30, 30], [12, 12, 32, 32], [50, 50, 70, 70],
                          [0, 0, 100, 5], [60, 10, 80, 30]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.99, 0.86])
    # 0.5 is too low, the 100 x 5 box too thin; NMS at 0.1 keeps 0.95 over 0.9
    assert bag_seeds(boxes, scores, 100, 100).tolist() == [[12, 12, 32, 32], [60, 10, 80, 30]]
    # 80 % of a box hangs out of the image (20 % inside): kept at area_ratio 0.18, dropped at 0.25
    out = torch.tensor([[-40.0, 0, 10, 50]])
    assert len(bag_seeds(out, torch.tensor([0.9]), 100, 100, area_ratio=0.18,
                         min_objectness=0.5)) == 1
    dropped = bag_seeds(torch.cat([out, boxes[4:]]), torch.tensor([0.9, 0.86]), 100, 100,
                        area_ratio=0.25)
    assert dropped.tolist() == [[60, 10, 80, 30]]
    low = bag_seeds(boxes[2:3], torch.tensor([0.5]), 100, 100)
    assert low.tolist() == [[50, 50, 70, 70]]  # none passes: the best box alone


def test_words_positions_packing_and_dropout():
    pos = sine_positions(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), features=4)
    # (cx, cy, w, h) = (0.5, 0.5, 1, 1); frequencies 10000^(0, 1/2) = 1, 100
    cx = [math.sin(math.pi), math.sin(math.pi / 100), math.cos(math.pi), math.cos(math.pi / 100)]
    w = [math.sin(2 * math.pi), math.sin(2 * math.pi / 100), math.cos(2 * math.pi),
         math.cos(2 * math.pi / 100)]
    assert pos[0].tolist() == pytest.approx(cx + cx + w + w, abs=1e-6)
    words = torch.arange(8.0).view(2, 4, 1)
    packed, lengths = pack_sentences(words, torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]]).bool())
    assert lengths.tolist() == [2, 1] and packed[0, :, 0].tolist() == [0, 2]
    assert packed[1, 0, 0].item() == 7
    kept = torch.ones(5, 3, dtype=torch.bool)
    assert torch.equal(drop_words(kept, 0.0), kept)
    only_first = drop_words(kept, 1.0, torch.Generator().manual_seed(0))
    assert only_first[:, 0].all() and not only_first[:, 1:].any()
    m = PseudoWords(embed_dim=8, width=6, words=2)
    assert m(torch.randn(3, 8), torch.rand(3, 4)).shape == (3, 2, 6)


# --------------------------------------------------------------------------- the text tower


def test_pseudo_text_of_word_embeddings_is_open_clips_text_embedding(teacher):
    tokens = teacher.tokenizer(["a red star", "ring"])
    words = teacher.model.token_embedding(tokens)[:, 1:4].clone().requires_grad_(True)
    lengths = tokens.argmax(-1) - 1  # between the start and the end token
    ours = teacher.pseudo_text(words, lengths)
    theirs = F.normalize(teacher.model.encode_text(tokens), dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours.sum().backward()
    assert words.grad.abs().sum() > 0 and words.grad[1, 1:].abs().sum() == 0  # unread words
    assert all(p.grad is None for p in teacher.model.parameters())
    assert teacher.context_length == 12 and teacher.word_width == 128
    with pytest.raises(ValueError, match="at most 10 words"):
        teacher.pseudo_text(torch.zeros(1, 11, 128), torch.tensor([11]))


def test_bag_outputs_read_each_bag_as_one_sentence(teacher):
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)
    bags = sample_bags(torch.tensor([[40.0, 40.0, 60.0, 60.0]]), 100, 120,
                       torch.Generator().manual_seed(2), GRID).as_dict()
    bags["words"] = torch.ones(len(bags["members"]), GRID, 1, dtype=torch.bool)
    emb = F.normalize(torch.randn(len(bags["boxes"]), teacher.embed_dim), dim=-1)
    words = PseudoWords(teacher.embed_dim, teacher.word_width, 1)
    out = bag_outputs(words, teacher, [image], [emb], [bags], [42])
    s = len(bags["members"])
    assert out["bag_embeddings"].shape == (s, teacher.embed_dim)
    assert out["bag_image_ids"].tolist() == [42.0] * s
    assert torch.equal(out["bag_groups"], bags["group"])
    spans = teacher.regions(image, bags["spans"])
    assert torch.allclose(out["bag_targets"], spans[bags["group"]], atol=1e-6)
    # bag 0 by hand: its boxes' pseudo-words in reading order, one sentence
    members = bags["members"][0][bags["members"][0] >= 0]
    w = words(emb[members], bags["normed"][0][: len(members)])[:, 0]
    by_hand = teacher.pseudo_text(w[None], torch.tensor([len(members)]))
    assert torch.allclose(out["bag_embeddings"][0], by_hand[0], atol=1e-5)


def test_bag_words_must_fit_the_text_context(teacher):
    from detectors.recipe import build_bag_words

    cfg = load_config(REPO / "configs/shapes/baron_tower.yaml")
    assert build_bag_words(cfg, teacher).words == 1
    too_many = load_config(REPO / "configs/shapes/baron_tower.yaml", ["loss.bags.words=2"])
    with pytest.raises(ConfigError, match=r"loss.bags.words: 9 regions x 2 words .* 12 tokens "
                                          r"\(at most 1 words\)"):
        build_bag_words(too_many, teacher)
    assert build_bag_words(load_config(REPO / "configs/shapes/vild.yaml"), teacher) is None
