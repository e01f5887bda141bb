"""Exported students (distill/export.py, detectors/predictor.py, tools/export.py, tools/demo.py)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import load_student
from detectors import recipe as detection
from distill.config import load_config
from distill.export import ExportError, Vocabulary, embed_vocabulary, parse_vocabulary
from tests.parity import assert_same_detections, threshold_between, without_open_clip
from tools import demo, export

REPO = Path(__file__).resolve().parents[1]
TINY = ["world.num_train=6", "world.num_val=3", "world.image_size=96", "world.max_objects=3",
        f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
        "teacher.model=tiny_vit", "teacher.pretrained=null", "teacher.dense_short_side=0",
        "train.max_iters=2", "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    cfg = load_config(REPO / "configs/shapes/vild_text.yaml",
                      [f"world.root={root / 'world'}", *TINY, f"output_dir={run}"])
    detection.train(cfg, progress=False)
    assert export.main(["--run", str(run), "--output", str(root / "student")]) == 0
    images = sorted((root / "world").glob("*/images/val/*.png"))
    return root, run, root / "student", images


def _key(found):
    return sorted((tuple(np.round(b, 3)), round(float(s), 5), n)
                  for b, s, n in zip(found["boxes"], found["scores"], found["names"], strict=True))


def test_export_round_trip_predicts_as_the_trained_model(exported):
    from distill.engine import load_weights
    from distill.teacher import Teacher

    root, run, student_dir, images = exported
    assert {p.name for p in student_dir.iterdir()} == {
        "model.safetensors", "config.json", "vocabulary.json", "text_embeddings.safetensors"}
    config = json.loads((student_dir / "config.json").read_text())
    cfg = load_config(run / "config.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    assert config["teacher"]["fingerprint"] == teacher.fingerprint
    vocab = json.loads((student_dir / "vocabulary.json").read_text())
    assert len(vocab["classes"]) == 16 and sum(vocab["novel"]) == 4
    # the trained model, fed the same vocabulary, finds exactly what the export finds
    model = detection.build_student(cfg, teacher).eval()
    load_weights(model, run / "model_final.safetensors")
    model.set_vocabulary(teacher.text([c[0] for c in vocab["classes"]]))
    student = load_student(student_dir)
    image = np.asarray(Image.open(images[0]).convert("RGB"))
    with torch.no_grad():
        ref = model([torch.from_numpy(image.copy()).permute(2, 0, 1)])[0]
    found = student.predict(images[0], score_threshold=0.0)
    assert len(found["scores"]) == len(ref["scores"]) > 0
    np.testing.assert_allclose(found["scores"], ref["scores"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found["boxes"], ref["boxes"].numpy(), rtol=1e-5, atol=1e-4)
    assert found["labels"] == (ref["labels"] - 1).tolist()
    # a path, an RGB array, a BGR array and a PIL image are the same picture
    for same in (student.predict(image, score_threshold=0.0),
                 student.predict(image[..., ::-1].copy(), score_threshold=0.0, bgr=True),
                 student.predict(Image.open(images[0]), score_threshold=0.0)):
        assert _key(same) == _key(found)
    # the threshold keeps exactly the scores at or above it (one equal to it included):
    # post-processing only those (ViLD.scores_at_least) loses none of them
    cut = float(found["scores"][len(found["scores"]) // 2])
    above = student.predict(image, score_threshold=cut)
    keep = found["scores"] >= np.float32(cut)
    assert len(above["scores"]) == keep.sum() > 0 and min(above["scores"]) == np.float32(cut)
    np.testing.assert_array_equal(above["scores"], found["scores"][keep])
    np.testing.assert_array_equal(above["boxes"], found["boxes"][keep])
    assert above["names"] == [n for n, k in zip(found["names"], keep, strict=True) if k]
    assert student.model.roi_heads.score_thresh == config["model"].get("box_score_thresh", 0.001)


def test_exported_student_loads_and_predicts_without_open_clip(exported):
    _, _, student_dir, images = exported
    found = without_open_clip(f"from detectors import load_student\n"
                              f"s = load_student({str(student_dir)!r})\n"
                              f"r = s.predict({str(images[0])!r}, score_threshold=0.0)\n"
                              f"print(len(r['names']))")
    assert int(found) > 0


def test_vocabulary_swap_changes_the_names_not_the_boxes(exported, tmp_path):
    root, run, student_dir, images = exported
    student = load_student(student_dir)
    names = student.vocabulary.names
    swapped = list(reversed(names))
    assert export.main(["--run", str(run), "--output", str(tmp_path / "vocab"),
                        "--vocabulary-only", "--vocabulary", ",".join(swapped)]) == 0
    before = student.predict(images[0], score_threshold=0.0)
    after = student.predict(images[0], vocabulary=tmp_path / "vocab", score_threshold=0.0)
    # same embeddings in reverse order: every detection keeps its box and score, and its
    # class index k becomes C-1-k, i.e. the same name
    assert _key(after) == _key(before)
    assert after["labels"] == [len(names) - 1 - k for k in before["labels"]]
    # novel flags follow the names: a class is novel unless it was a training class
    vocab = Vocabulary.load(tmp_path / "vocab")
    assert [n for n, nov in zip(vocab.names, vocab.novel, strict=True) if nov] == [
        n for n, nov in zip(reversed(names), reversed(student.vocabulary.novel), strict=True) if nov]
    # the call's vocabulary was for that call only
    assert student.vocabulary.names == names
    # a vocabulary with other names gives other names
    assert export.main(["--run", str(run), "--output", str(tmp_path / "two"), "--vocabulary-only",
                        "--vocabulary", "apple|pomme,pear"]) == 0
    found = student.predict(images[0], vocabulary=tmp_path / "two", score_threshold=0.0)
    assert set(found["names"]) <= {"apple", "pear"} and found["names"]
    assert all(found["novel"])


def test_synonyms_are_averaged_then_normalised():
    class FakeTeacher:
        fingerprint = "f" * 16

        def text(self, names):
            table = {"cat": [1.0, 0.0, 0.0], "kitty": [0.0, 1.0, 0.0], "dog": [0.0, 0.0, 1.0]}
            return torch.tensor([table[n] for n in names])

    vocab = embed_vocabulary(FakeTeacher(), parse_vocabulary("cat|kitty, dog"), [False, True])
    assert vocab.names == ["cat", "dog"] and vocab.classes == [["cat", "kitty"], ["dog"]]
    s = 2 ** -0.5
    torch.testing.assert_close(vocab.embeddings, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    assert vocab.teacher_fingerprint == "f" * 16


def test_vocabulary_files_and_errors(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# my classes\ncircle | round\n\nsquare  # four sides\n")
    assert parse_vocabulary(str(names)) == [["circle", "round"], ["square"]]
    assert parse_vocabulary(["a", "b|c"]) == [["a"], ["b", "c"]]
    with pytest.raises(ExportError, match="no class names"):
        parse_vocabulary(" , ,")
    with pytest.raises(ExportError, match="'Circle' given twice"):
        parse_vocabulary("circle,square|Circle")
    with pytest.raises(ExportError, match="missing.txt: vocabulary file not found"):
        parse_vocabulary(str(tmp_path / "missing.txt"))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_a_pickle_posing_as_the_checkpoint_is_refused(exported, tmp_path):
    import shutil

    _, _, student_dir, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(student_dir, bad)
    _Payload.target = str(tmp_path / "pwned")
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(ExportError, match=r"model.safetensors: not a safetensors file .*"
                                          r"pickled checkpoints are refused"):
        load_student(bad)
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config.json: malformed JSON"):
        load_student(bad)
    with pytest.raises(ExportError, match="not an exported student directory"):
        load_student(tmp_path / "nowhere")


def test_export_overwrites_atomically_and_cli_errors_are_one_line(exported, tmp_path, capsys):
    root, run, student_dir, _ = exported
    out = tmp_path / "student"
    assert export.main(["--run", str(run), "--output", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert export.main(["--run", str(run), "--output", str(out)]) == 0  # replaced whole
    assert (out / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary left behind
    capsys.readouterr()
    assert export.main(["--run", str(tmp_path / "nope"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope/config.yaml: missing" in err and "\n" not in err
    assert export.main(["--run", str(run), "--output", str(out), "--vocabulary", "a,a"]) == 2
    assert "'a' given twice" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first  # the failed run wrote nothing


def test_onnx_runtime_matches_pytorch(exported, tmp_path, threads):
    import shutil

    from detectors.onnx import OnnxDetector, export_onnx

    _, _, student_dir, images = exported
    student_copy = tmp_path / "student"
    shutil.copytree(student_dir, student_copy)
    # the 20 likeliest anchors per level (which ones depends on the picture) go to NMS and
    # all its survivors are kept, so the proposal count differs from picture to picture
    # (and from the export's example): the graph must not have baked it in
    config = json.loads((student_copy / "config.json").read_text())
    config["model"].update(rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=1000)
    (student_copy / "config.json").write_text(json.dumps(config))
    student = load_student(student_copy)
    # a 2-iteration RPN scores anchors by their bias alone; strong random objectness weights
    # make which anchors win depend on the picture (parity holds for any weights)
    torch.manual_seed(0)
    torch.nn.init.normal_(student.model.rpn.head.cls_logits.weight, std=1.0)
    pictures = [np.array(Image.open(p).convert("RGB")) for p in images]
    pictures += [np.full((96, 96, 3), 128, np.uint8), np.zeros((96, 96, 3), np.uint8),
                 np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)]
    # the two runtimes agree to ~1e-6: detections on a threshold, the top-100 cut or an NMS
    # boundary may fall either way (tests/parity.py); every other one must match
    export_onnx(student, student_copy / "model.onnx")
    onnx = OnnxDetector(student_copy, threads=threads)
    for image in pictures:
        assert_same_detections(onnx.predict(image, score_threshold=0.0),
                               student.predict(image, score_threshold=0.0), student, [0.0])
    # the vocabulary is an input of the graph: a smaller one needs no re-export
    vocab = Vocabulary(student.vocabulary.classes[:5], student.vocabulary.embeddings[:5],
                       student.vocabulary.novel[:5])
    got = onnx.predict(images[0], vocabulary=vocab, score_threshold=0.0)
    assert_same_detections(got, student.predict(images[0], vocabulary=vocab,
                                                score_threshold=0.0), student, [0.0])
    assert set(got["names"]) <= set(vocab.names)
    # the score threshold is an input too: the same detections above it as PyTorch's, with
    # the threshold halfway between two of PyTorch's scores (never on one)
    ref = student.predict(images[0], score_threshold=0.0)
    cut = threshold_between(ref["scores"])
    above = student.predict(images[0], score_threshold=cut)
    assert 0 < len(above["scores"]) < len(ref["scores"])
    assert_same_detections(onnx.predict(images[0], score_threshold=cut), above, student, [cut])


def test_demo_draws_and_writes_predictions(exported, tmp_path):
    _, _, student_dir, images = exported
    out = tmp_path / "demo"
    assert demo.main(["--student", str(student_dir), "--output", str(out),
                      "--score-threshold", "0", str(images[0]), str(images[1])]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(p.name for p in images[:2])
    drawn = np.asarray(Image.open(out / images[0].name))
    assert drawn.shape[:2] == np.asarray(Image.open(images[0])).shape[:2]
    assert not np.array_equal(drawn, np.asarray(Image.open(images[0]).convert("RGB")))
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image"] for p in predictions] == [str(images[0]), str(images[1])]
    assert {"box", "score", "name", "novel"} == set(predictions[0]["detections"][0])
    # --show-teacher: the teacher's result drawn right of the student's
    assert demo.main(["--student", str(student_dir), "--output", str(tmp_path / "both"),
                      "--show-teacher", str(images[0])]) == 0
    both = Image.open(tmp_path / "both" / images[0].name)
    assert both.width == 2 * drawn.shape[1] + 4 and both.height == drawn.shape[0]
    # a folder is every image in it
    assert demo.main(["--student", str(student_dir), "--output", str(tmp_path / "all"),
                      str(images[0].parent)]) == 0
    assert len(list((tmp_path / "all").glob("*.png"))) == len(images)


def _by_name(found, name):
    """(box, score) rows of one name, in a fixed order."""
    rows = [(*np.asarray(b, np.float64).tolist(), float(s)) for b, s, n in
            zip(found["boxes"], found["scores"], found["names"], strict=True) if n == name]
    return np.array(sorted(rows)).reshape(-1, 5)


@pytest.mark.parametrize("scoring", ["reference", "pairwise"])
def test_scores_do_not_depend_on_the_other_names(exported, tmp_path, scoring):
    """model.scoring=reference (the default) and pairwise: a name's detections and scores are
    the same (to 1e-6) with the whole vocabulary, three names or that name alone, in PyTorch
    and in ONNX Runtime, for a training (base) name and a novel one."""
    import shutil

    from detectors.onnx import OnnxDetector, export_onnx

    _, _, student_dir, images = exported
    copy = tmp_path / "student"
    shutil.copytree(student_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    # every box kept (no score cut, no top-k): a 1e-7 difference between two vocabularies'
    # matrix products must not move a detection across a threshold
    config["model"].update(scoring=scoring, box_detections_per_img=100000,
                           box_score_thresh=-1.0)
    (copy / "config.json").write_text(json.dumps(config))
    student = load_student(copy)
    assert student.model.roi_heads.scoring == scoring
    vocab = student.vocabulary
    base, novel = vocab.novel.index(False), vocab.novel.index(True)
    export_onnx(student, copy / "model.onnx")
    onnx = OnnxDetector(copy)
    for k in (base, novel):
        others = [j for j in range(len(vocab)) if j != k][:2]
        subsets = [vocab] + [Vocabulary([vocab.classes[j] for j in pick],
                                        vocab.embeddings[pick], [vocab.novel[j] for j in pick])
                             for pick in ([others[0], k, others[1]], [k])]
        for predict in (student.predict, onnx.predict):
            found = [_by_name(predict(images[0], vocabulary=v, score_threshold=0.0),
                              vocab.names[k]) for v in subsets]
            assert len(found[0]) > 0
            for other in found[1:]:
                np.testing.assert_allclose(other, found[0], atol=1e-6, rtol=0)


@torch.no_grad()
def test_reference_and_pairwise_scores_by_hand(exported):
    """Each scoring against its definition on random region embeddings: reference, a
    name's softmax over [background, training names, the name] (a training name counted
    once); pairwise, sigmoid((cos(name) - cos(background)) / T); softmax, ViLD's, moves
    with the other names."""
    from detectors.vild import EmbeddingRoIHeads

    run, student_dir = exported[1], exported[2]
    cfg, teacher, _ = detection.load_trained(run)
    heads = load_student(student_dir).model.roi_heads
    training = teacher.text(detection.train_set(cfg).names)  # the saved training names
    torch.testing.assert_close(heads.reference_embeddings, training, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, heads.background.shape[0]), dim=-1)
    t, bg = heads.temperature, heads.background_embedding()
    new = torch.nn.functional.normalize(torch.randn(1, len(bg)), dim=-1)  # an unseen name
    heads.text_embeddings = torch.cat([training[1:2], new])
    heads.scoring = "reference"
    probs = heads.class_probs(emb)
    for r in range(len(emb)):
        ref = torch.cat([emb[r] @ bg[:, None], training @ emb[r]]) / t
        assert probs[r, 1] == pytest.approx(float(torch.softmax(ref, 0)[2]), abs=1e-6)
        with_new = torch.cat([ref, (new @ emb[r]) / t])
        assert probs[r, 2] == pytest.approx(float(torch.softmax(with_new, 0)[-1]), abs=1e-6)
        assert probs[r, 0] == pytest.approx(1 - float(probs[r, 1:].max()), abs=1e-6)
    heads.scoring = "pairwise"
    want = torch.sigmoid((emb @ heads.text_embeddings.T - emb @ bg[:, None]) / t)
    torch.testing.assert_close(heads.class_probs(emb)[:, 1:], want, atol=1e-6, rtol=0)
    heads.scoring = "softmax"  # ViLD's: the same name scores differently beside others
    one = heads.class_probs(emb)[:, 1]
    heads.text_embeddings = training[1:2]
    assert (heads.class_probs(emb)[:, 1] - one).abs().max() > 1e-3
    with pytest.raises(ValueError, match="model.scoring must be one of reference, softmax, "):
        EmbeddingRoIHeads(heads.box_roi_pool, heads.text_head, None, 8, scoring="sigmoid")


def test_few_names_measure_with_vocabulary_independent_scores(exported):
    """With pairwise scores (and no top-k cut) a class's detections do not depend on the other
    names, so its AP50 with 3 names equals its AP50 with every name: detectors/few_names.py
    must find exactly that. Softmax scores change it."""
    from detectors.few_names import few_names

    _, run, _, _ = exported
    cfg, teacher, model = detection.load_trained(run)
    val = detection.val_set(cfg)
    text = teacher.text(val.names)
    model.roi_heads.scoring, model.roi_heads.detections_per_img = "pairwise", 100000
    m = few_names(model, val, text, val.novel, [0.0, 0.5], rounds=1, progress=False)
    assert m["per_class"] and set(m["per_class"]) <= set(val.names) and m["subsets"] == 6
    for name, ap in m["per_class"].items():
        assert ap["few"] == pytest.approx(ap["all"], abs=1e-9), name
    assert m["unnamed_per_image"][0.0] >= m["unnamed_per_image"][0.5]
    assert m["unnamed_per_image"][0.0] + m["named_per_image"][0.0] > 0
    model.roi_heads.scoring = "softmax"
    soft = few_names(model, val, text, val.novel, [0.0], rounds=1, progress=False)
    assert any(abs(a["few"] - a["all"]) > 1e-6 for a in soft["per_class"].values())
