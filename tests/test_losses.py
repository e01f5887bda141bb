"""distill/losses.py against hand computations on tiny tensors (D = 2, C = 2)."""

import math

import pytest
import torch

from detectors.criterion import DetectionCriterion
from detectors.vild import ensemble_scores
from distill.baron import EmbeddingQueue
from distill.config import LossConfig
from distill.losses import (
    MissingOutputError,
    box_regression_loss,
    vild_image_loss,
    vild_text_loss,
)


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# Shared tiny problem: text t1 = (1, 0), t2 = (0, 1); background (0.6, -0.8);
# RoI 0 = (0.6, 0.8) of class 1 (vocabulary index 0), RoI 1 = (1, 0) background.
TEXT = ((1.0, 0.0), (0.0, 1.0))
BG = (0.6, -0.8)
REGIONS = ((0.6, 0.8), (1.0, 0.0))
LABELS = (1, 0)
# temperature 0.5: RoI 0 dots [bg, t1, t2] = [-0.28, 0.6, 0.8] -> logits [-0.56, 1.2, 1.6];
#                  RoI 1 dots [0.6, 1, 0] -> logits [1.2, 2, 0]
TEXT_LOSS_T05 = ((-1.2 + lse(-0.56, 1.2, 1.6)) + (-1.2 + lse(1.2, 2.0, 0.0))) / 2


def outputs(**over) -> dict:
    o = {
        "region_embeddings": t(*REGIONS, grad=True),
        "labels": torch.tensor(LABELS),
        "box_regression": t((0.05, -0.5, 0.0, 1.0), (5.0, 5.0, 5.0, 5.0), grad=True),
        "regression_targets": torch.zeros(2, 4),
        "text_embeddings": t(*TEXT),
        "background_embedding": t(*BG, grad=True),
        "temperature": 0.5,
        "distill_embeddings": t((0.6, 0.8), (1.0, 0.0), grad=True),
        "distill_targets": t((0.8, 0.6), (0.0, 1.0)),
        "rpn_losses": {"loss_objectness": torch.tensor(0.7), "loss_rpn_box_reg": torch.tensor(0.3)},
    }
    o.update(over)
    return o


# --------------------------------------------------------------------------- ViLD-text


def test_vild_text_loss_by_hand_and_background_gradient():
    e, bg = t(*REGIONS, grad=True), t(*BG, grad=True)
    loss = vild_text_loss(e, torch.tensor(LABELS), t(*TEXT), bg, temperature=0.5)
    assert loss.item() == pytest.approx(TEXT_LOSS_T05, rel=1e-6)
    loss.backward()
    # d loss / d bg = 1/R * 1/T * sum_r (p_bg(r) - [y_r = 0]) e_r
    p0 = math.exp(-0.56) / math.exp(lse(-0.56, 1.2, 1.6))
    p1 = math.exp(1.2) / math.exp(lse(1.2, 2.0, 0.0))
    want = [(p0 * 0.6 + (p1 - 1) * 1.0) / 2 / 0.5, (p0 * 0.8 + (p1 - 1) * 0.0) / 2 / 0.5]
    assert bg.grad.tolist() == pytest.approx(want, rel=1e-5)
    assert bg.grad.abs().sum() > 0.1


def test_pairwise_vild_text_loss_by_hand():
    """model.scoring=pairwise: BCE on (e.t_c - e.bg) / T, summed over classes, mean over RoIs.
    Region 0 (class 1): e.t = (0.6, 0.8), e.bg = 0.36 - 0.64 = -0.28 -> logits (0.88, 1.08)
    / 0.5 = (1.76, 2.16), targets (1, 0). Region 1 (background): e.t = (1, 0), e.bg = 0.6 ->
    logits (0.8, -1.2), targets (0, 0)."""
    def bce(z, y):  # -[y log s(z) + (1 - y) log(1 - s(z))]
        return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))

    e, bg = t(*REGIONS, grad=True), t(*BG, grad=True)
    loss = vild_text_loss(e, torch.tensor(LABELS), t(*TEXT), bg, 0.5, scoring="pairwise")
    want = (bce(1.76, 1) + bce(2.16, 0) + bce(0.8, 0) + bce(-1.2, 0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert bg.grad.abs().sum() > 0.1  # the background embedding learns from every name
    # the criterion picks it when the outputs say the student scores pairwise
    outputs = {"region_embeddings": t(*REGIONS), "labels": torch.tensor(LABELS),
               "text_embeddings": t(*TEXT), "background_embedding": t(*BG),
               "temperature": 0.5, "scoring": "pairwise"}
    assert DetectionCriterion().compute("vild_text", outputs).item() == pytest.approx(want, rel=1e-6)
    outputs["scoring"] = "softmax"
    assert DetectionCriterion().compute("vild_text", outputs).item() == pytest.approx(TEXT_LOSS_T05,
                                                                             rel=1e-6)


def test_vild_text_loss_default_temperature_is_001():
    e = t((0.6, 0.8))  # logits x 100: [-28, 60, 80], class 1 (index 1)
    loss = vild_text_loss(e, torch.tensor([1]), t(*TEXT), t(*BG))
    assert loss.item() == pytest.approx(-60 + lse(-28, 60, 80), rel=1e-6)
    tensor_temp = vild_text_loss(e, torch.tensor([1]), t(*TEXT), t(*BG), torch.tensor(0.01))
    assert tensor_temp.item() == pytest.approx(loss.item(), rel=1e-6)


def test_vild_text_loss_empty_is_zero_with_graph():
    e, bg = torch.zeros(0, 2, requires_grad=True), t(*BG, grad=True)
    loss = vild_text_loss(e, torch.zeros(0, dtype=torch.long), t(*TEXT), bg)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert bg.grad.tolist() == [0.0, 0.0] and e.grad.shape == (0, 2)


# --------------------------------------------------------------------------- box regression


def test_box_regression_loss_by_hand():
    # RoI 1 is background: its large error must not count. smooth L1, beta = 1/9:
    # |d| < 1/9: 0.5 d^2 * 9, else |d| - 1/18. Divided by R = 3.
    reg = t((0.05, -0.5, 0.0, 1.0), (9.0, 9.0, 9.0, 9.0), (0.1, 0.0, -0.02, 2.0), grad=True)
    loss = box_regression_loss(reg, torch.zeros(3, 4), torch.tensor([1, 0, 2]))
    row0 = 0.5 * 0.05**2 * 9 + (0.5 - 1 / 18) + 0 + (1 - 1 / 18)
    row2 = 0.5 * 0.1**2 * 9 + 0 + 0.5 * 0.02**2 * 9 + (2 - 1 / 18)
    assert loss.item() == pytest.approx((row0 + row2) / 3, rel=1e-6)
    loss.backward()
    assert reg.grad[1].tolist() == [0.0] * 4
    assert reg.grad[0].tolist() == pytest.approx([0.05 * 9 / 3, -1 / 3, 0.0, 1 / 3], rel=1e-5)


@pytest.mark.parametrize("n", [0, 3])
def test_box_regression_loss_without_positives_is_zero(n):
    reg = torch.ones(n, 4, requires_grad=True)
    loss = box_regression_loss(reg, torch.zeros(n, 4), torch.zeros(n, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(reg.grad, torch.zeros(n, 4))


# --------------------------------------------------------------------------- ViLD-image


def test_vild_image_loss_by_hand():
    s = t((0.6, 0.8), (1.0, 0.0), grad=True)
    target = t((0.8, 0.6), (0.0, 1.0), grad=True)
    loss = vild_image_loss(s, target)  # L1 sums 0.4 and 2.0 -> mean 1.2
    assert loss.item() == pytest.approx(1.2, rel=1e-6)
    loss.backward()
    assert s.grad.flatten().tolist() == pytest.approx([-0.5, 0.5, 0.5, -0.5])
    assert target.grad is None  # teacher targets are detached


def test_vild_image_loss_empty_proposals():
    s = torch.zeros(0, 2, requires_grad=True)
    loss = vild_image_loss(s, torch.zeros(0, 2))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad.shape == (0, 2)


# --------------------------------------------------------------------------- queue


def test_queue_fifo_order_and_detach():
    q = EmbeddingQueue(size=4)
    assert len(q) == 0 and q.contents().shape[0] == 0
    rows = [[float(i), -float(i)] for i in range(1, 12)]
    q.enqueue(torch.tensor(rows[0:2]))
    assert q.contents().tolist() == rows[0:2]
    q.enqueue(torch.tensor(rows[2:3], requires_grad=True))
    assert q.contents().tolist() == rows[0:3]
    q.enqueue(torch.tensor(rows[3:6]))  # 1 and 2 fall out
    assert q.contents().tolist() == rows[2:6] and len(q) == 4
    assert not q.contents().requires_grad
    held = q.contents()
    q.enqueue(torch.tensor(rows[6:7]))  # a copy: what a loss read stays as it was
    assert held.tolist() == rows[2:6]
    q.enqueue(torch.tensor(rows[6:11]))  # more than the size: keep the newest 4
    assert q.contents().tolist() == rows[7:11]
    q.enqueue(torch.zeros(0, 2))
    assert q.contents().tolist() == rows[7:11]
    with pytest.raises(ValueError, match="2-d"):
        q.enqueue(torch.zeros(1, 3))
    fresh = EmbeddingQueue(size=4)  # lazily sized: loads a saved state
    fresh.load_state_dict(q.state_dict())
    assert fresh.contents().tolist() == rows[7:11]
    fresh.enqueue(torch.tensor(rows[0:1]))
    assert fresh.contents().tolist() == rows[8:11] + rows[0:1]


# --------------------------------------------------------------------------- criterion


def test_criterion_defaults():
    crit = DetectionCriterion()
    assert crit.weights == {"vild_text": 1.0, "box_reg": 1.0, "vild_image": 0.5,
                            "bag": 0.0, "objectness": 1.0, "rpn_box_reg": 1.0,
                            "mask": 1.0}
    losses = crit(outputs())  # no mask head outputs: no mask loss
    assert set(losses) == {"loss_vild_text", "loss_box_reg", "loss_vild_image",
                           "loss_objectness", "loss_rpn_box_reg"}
    assert losses["loss_vild_image"].item() == pytest.approx(0.5 * 1.2, rel=1e-6)
    assert losses["loss_vild_text"].item() == pytest.approx(TEXT_LOSS_T05, rel=1e-6)
    assert len(crit.student_bags) == 0 and crit.words is None  # BARON off: nothing queued


def test_criterion_applies_weights():
    crit = DetectionCriterion({"vild_text": 2.0, "box_reg": 0.5, "vild_image": 0.25,
                      "objectness": 3.0, "rpn_box_reg": 0.0})
    o = outputs()
    losses = crit(o)
    assert set(losses) == {"loss_vild_text", "loss_box_reg", "loss_vild_image", "loss_objectness"}
    box = (0.5 * 0.05**2 * 9 + (0.5 - 1 / 18) + (1 - 1 / 18)) / 2
    assert losses["loss_vild_text"].item() == pytest.approx(2.0 * TEXT_LOSS_T05, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx(0.5 * box, rel=1e-6)
    assert losses["loss_vild_image"].item() == pytest.approx(0.25 * 1.2, rel=1e-6)
    assert losses["loss_objectness"].item() == pytest.approx(3.0 * 0.7, rel=1e-6)
    sum(losses.values()).backward()
    assert o["background_embedding"].grad.abs().sum() > 0
    assert o["distill_embeddings"].grad.abs().sum() > 0


def test_criterion_takes_the_teachers_targets_apart_from_the_model_outputs():
    """criterion(outputs, targets), as DETR's: the cached teacher embeddings come as targets
    and give the losses the merged dict gives; a key on both sides is refused."""
    crit = DetectionCriterion({"vild_image": 0.25})
    o = outputs()
    targets = {"distill_targets": o.pop("distill_targets")}
    split = crit(o, targets)
    assert split["loss_vild_image"].item() == pytest.approx(0.25 * 1.2, rel=1e-6)
    assert {k: v.item() for k, v in split.items()} == {
        k: v.item() for k, v in crit({**o, **targets}).items()}
    with pytest.raises(ValueError, match=r"\['distill_targets'\] given both as model outputs "
                                         r"and as targets"):
        crit(outputs(), targets)


def test_criterion_empty_batch_and_unannotated_images():
    crit = DetectionCriterion()
    empty = outputs(region_embeddings=torch.zeros(0, 2, requires_grad=True),
                    labels=torch.zeros(0, dtype=torch.long),
                    box_regression=torch.zeros(0, 4, requires_grad=True),
                    regression_targets=torch.zeros(0, 4),
                    distill_embeddings=torch.zeros(0, 2, requires_grad=True),
                    distill_targets=torch.zeros(0, 2))
    losses = crit(empty)
    assert all(v.item() == 0.0 for k, v in losses.items() if not k.startswith("loss_rpn")
               and k != "loss_objectness")
    sum(losses.values()).backward()
    assert empty["background_embedding"].grad.tolist() == [0.0, 0.0]

    # images without annotations: every sampled RoI is background
    bg_only = outputs(labels=torch.zeros(2, dtype=torch.long))
    losses = crit(bg_only)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0
    want = ((0.56 + lse(-0.56, 1.2, 1.6)) + (-1.2 + lse(1.2, 2.0, 0.0))) / 2
    assert losses["loss_vild_text"].item() == pytest.approx(want, rel=1e-6)
    sum(losses.values()).backward()
    assert bg_only["background_embedding"].grad.abs().sum() > 0.1
    assert torch.isfinite(bg_only["region_embeddings"].grad).all()


def test_criterion_missing_outputs_and_bad_weights():
    o = outputs()
    del o["distill_embeddings"]
    with pytest.raises(MissingOutputError, match="distill_embeddings") as err:
        DetectionCriterion()(o)
    assert isinstance(err.value, KeyError) and "vild_image" in str(err.value)
    assert set(DetectionCriterion({"vild_image": 0.0})(o)) == {
        "loss_vild_text", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    o = outputs()
    del o["rpn_losses"]
    with pytest.raises(KeyError, match="rpn_losses"):
        DetectionCriterion()(o)
    o = outputs(rpn_losses={"loss_objectness": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="loss_rpn_box_reg"):
        DetectionCriterion()(o)
    with pytest.raises(KeyError, match="vild_txt"):
        DetectionCriterion({"vild_txt": 1.0})


def test_variants_from_config():
    vild_image = DetectionCriterion.from_config(LossConfig(vild_text=0.0))
    o = outputs()
    del o["background_embedding"]  # not needed without the text loss
    assert set(vild_image(o)) == {"loss_box_reg", "loss_vild_image", "loss_objectness",
                                  "loss_rpn_box_reg"}
    vild_text = DetectionCriterion.from_config(LossConfig(vild_image=0.0))
    assert "loss_vild_image" not in vild_text(outputs()) and "loss_vild_text" in vild_text(outputs())
    cfg = LossConfig()
    assert {k: getattr(cfg, k) for k in DetectionCriterion.DEFAULTS} == DetectionCriterion.DEFAULTS
    assert DetectionCriterion.from_config(cfg).student_bags.size == 1024  # BARON's
    assert DetectionCriterion.from_config(cfg).bag_temperature == pytest.approx(1 / 30, rel=1e-3)


# --------------------------------------------------------------------------- ensemble


def test_ensemble_scores_by_hand():
    novel = torch.tensor([False, True])  # class 0 base, class 1 novel
    text = t((0.1, 0.8, 0.1))  # background first
    image = t((0.3, 0.2, 0.5))
    s = ensemble_scores(text, image, novel)
    want = [0.1, 0.8 ** (2 / 3) * 0.2 ** (1 / 3), 0.1 ** (1 / 3) * 0.5 ** (2 / 3)]
    assert s.tolist()[0] == pytest.approx(want, rel=1e-6)
    no_bg = ensemble_scores(text[:, 1:], image[:, 1:], novel)
    assert no_bg.tolist()[0] == pytest.approx(want[1:], rel=1e-6)
    half = ensemble_scores(text[:, 1:], image[:, 1:], novel, lam=0.5)
    assert half.tolist()[0] == pytest.approx([math.sqrt(0.16), math.sqrt(0.05)], rel=1e-6)
    with pytest.raises(ValueError):
        ensemble_scores(t((0.5, 0.3, 0.1, 0.1)), t((0.5, 0.3, 0.1, 0.1)), novel)
    # ViLD's image branch has no background column: (N, C) beside the text's (N, 1 + C)
    image_names = t((0.25, 0.75))
    s = ensemble_scores(text, image_names, novel)
    assert s.tolist()[0] == pytest.approx(
        [0.1, 0.8 ** (2 / 3) * 0.25 ** (1 / 3), 0.1 ** (1 / 3) * 0.75 ** (2 / 3)], rel=1e-6)
    with pytest.raises(ValueError, match="do not fit C=2"):
        ensemble_scores(text[:, 1:], t((0.3, 0.2, 0.5)), novel)  # image with, text without


def test_the_ensembles_image_branch_scores_names_without_the_background():
    """ViLD-ensemble as the reference has it: the image head's probabilities run over the
    vocabulary alone; the text branch keeps the background. By hand, temperature 1: a region
    at cosines (names) 0.6, 0.2, background 0.9, training names = the first two names."""
    from detectors import build_detector

    m = build_detector("vild_r18_fpn", embed_dim=3, hidden=8, image_size=64, ensemble=True,
                       temperature=1.0)
    heads = m.roi_heads
    names = torch.eye(3)  # name k's embedding: axis k
    m.set_training_vocabulary(names[:2])
    m.set_vocabulary(names, torch.tensor([False, False, True]))
    region = torch.tensor([[0.6, 0.2, 0.5]])
    heads.scoring = "softmax"
    e = [math.exp(x) for x in (0.6, 0.2, 0.5)]
    assert heads.name_probs(region).tolist()[0] == pytest.approx([x / sum(e) for x in e])
    heads.scoring = "reference"  # each name against the training names (0.6, 0.2) and itself
    ref = math.exp(0.6) + math.exp(0.2)
    want = [math.exp(0.6) / ref, math.exp(0.2) / ref, math.exp(0.5) / (ref + math.exp(0.5))]
    assert heads.name_probs(region).tolist()[0] == pytest.approx(want, rel=1e-6)
    # the same names in any company: the third alone scores as beside the others
    m.set_vocabulary(names[2:], torch.tensor([True]))
    assert heads.name_probs(region).tolist()[0] == pytest.approx(want[2:], rel=1e-6)


def test_class_logits_are_float32_under_bf16_autocast():
    """Under bf16 autocast (train.amp) cosine / 0.01 is computed in float32: the loss and the
    scores equal the float32 ones (a bf16 product rounds a logit of 100 by up to 0.4)."""
    from distill.scoring import cosine_logits

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    bg = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=-1)
    labels = torch.randint(0, 6, (64,), generator=g)
    want = vild_text_loss(emb, labels, text, bg, 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vild_text_loss(emb, labels, text, bg, 0.01)
        logits = cosine_logits(emb, text, 0.01)
        maps = cosine_logits(emb.T.reshape(1, 32, 8, 8), text, 0.01, maps=True)
        rounded = emb @ text.T / 0.01  # what autocast makes of a plain product
    assert got.dtype == logits.dtype == maps.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(logits, emb @ text.T / 0.01)
    assert torch.allclose(maps, (emb @ text.T / 0.01).T.reshape(1, 5, 8, 8), atol=1e-5)
    assert (rounded.float() - logits).abs().max() > 1e-2  # the rounding this avoids
