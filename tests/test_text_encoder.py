"""Names typed at run time: an export that carries the teacher's text tower alone
(``tools/export.py --text-encoder``, distill/text_encoder.py) embeds them as the
teacher does, in PyTorch and in ONNX Runtime, for detectors and segmenters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from detectors import load_student
from detectors import recipe as detection
from distill.config import load_config
from distill.export import ExportError, embed_vocabulary, parse_vocabulary
from distill.teacher import Teacher
from distill.text_encoder import MAX_NAMES, OnnxTextEncoder, TextEncoder
from tests.parity import assert_same_detections
from tools import export

REPO = Path(__file__).resolve().parents[1]
TINY = ["world.num_train=6", "world.num_val=3", "world.image_size=96", "world.max_objects=3",
        f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_rn.json'}",
        "teacher.model=tiny_rn", "teacher.pretrained=null", "teacher.dense_short_side=0",
        "train.max_iters=2", "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16", "seg.name=seg_r10_fpn", "seg.norm=gn"]
NAMES = ["bolt", "star|pentagram", "a thing nobody trained"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("typed")
    run = root / "run"
    cfg = load_config(REPO / "configs/shapes/vild_text.yaml",
                      [f"world.root={root / 'world'}", *TINY, f"output_dir={run}"])
    detection.train(cfg, progress=False)
    student = root / "student"
    assert export.main(["--run", str(run), "--output", str(student), "--text-encoder",
                        "--onnx"]) == 0
    images = sorted((root / "world").glob("*/images/val/*.png"))
    return Teacher.from_config(cfg.teacher), student, images


def test_the_text_encoder_is_the_teachers_text_tower_alone(exported):
    teacher, student, _ = exported
    directory = student / "text_encoder"
    assert {p.name for p in directory.iterdir()} == {
        "config.json", "model.safetensors", "bpe_simple_vocab_16e6.txt.gz", "text.onnx",
        f"ovdistill_text_{teacher.fingerprint}.json"}
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith("visual.") for k in keys)
    assert keys == {k for k in teacher.model.state_dict() if not k.startswith("visual.")}
    encoder = TextEncoder.load(directory)
    assert encoder.fingerprint == teacher.fingerprint and encoder.templates == teacher.templates
    names = ["bolt", "star", "a thing nobody trained", "drop"]
    torch.testing.assert_close(encoder.text(names), teacher.text(names), rtol=0, atol=1e-6)
    # ONNX Runtime on text.onnx, the prompt ensemble done outside the graph
    torch.testing.assert_close(OnnxTextEncoder(directory).text(names), teacher.text(names),
                               rtol=0, atol=1e-5)
    assert encoder.text([]).shape == (0, teacher.embed_dim)


def test_typed_names_predict_as_the_teachers_vocabulary(exported):
    teacher, student_dir, images = exported
    student = load_student(student_dir)
    want = embed_vocabulary(teacher, parse_vocabulary(NAMES))
    for image in images:
        typed = student.predict(image, names=NAMES, score_threshold=0.0)
        ref = student.predict(image, vocabulary=want, score_threshold=0.0)
        assert_same_detections(typed, ref, student, [0.0])
        assert set(typed["names"]) <= {"bolt", "star", "a thing nobody trained"}
    # a comma-separated string is the same vocabulary; the student's own is back after
    vocab = student.typed(",".join(NAMES))
    assert vocab is student.typed(NAMES)  # cached
    assert vocab.classes == [["bolt"], ["star", "pentagram"], ["a thing nobody trained"]]
    torch.testing.assert_close(vocab.embeddings, want.embeddings, rtol=0, atol=1e-6)
    assert len(student.vocabulary) == 16
    # novel unless a name is a training class (config.json's training_names)
    trained = json.loads((student_dir / "config.json").read_text())["training_names"]
    assert "star" in trained and "bolt" not in trained and len(trained) == 12
    assert vocab.novel == [True, False, True]


def test_typed_names_in_onnx_runtime(exported, threads):
    from detectors.onnx import OnnxDetector

    _, student_dir, images = exported
    student = load_student(student_dir)
    onnx = OnnxDetector(student_dir, threads=threads)
    assert_same_detections(onnx.predict(images[0], names=NAMES, score_threshold=0.0),
                           student.predict(images[0], names=NAMES, score_threshold=0.0),
                           student, [0.0])


def test_typed_names_errors(exported, tmp_path):
    import shutil

    _, student_dir, images = exported
    student = load_student(student_dir)
    with pytest.raises(ValueError, match="give a vocabulary or names, not both"):
        student.predict(images[0], vocabulary=student.vocabulary, names=NAMES)
    with pytest.raises(ExportError, match=f"^{MAX_NAMES + 1} names: at most {MAX_NAMES} at once$"):
        student.predict(images[0], names=[f"name {i}" for i in range(MAX_NAMES + 1)])
    with pytest.raises(ExportError, match="no class names"):
        student.predict(images[0], names=" , ")
    bare = tmp_path / "bare"
    shutil.copytree(student_dir, bare, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(ExportError, match=f"^{bare}: this export carries no text encoder to "
                                          f"embed typed names; write it with tools/export.py "
                                          f"--text-encoder$"):
        load_student(bare).predict(images[0], names=NAMES)
    own = load_student(bare)  # its own vocabulary still works without the text encoder
    found = own.predict(images[0], score_threshold=0.0)
    assert len(found["names"]) > 0 and set(found["names"]) <= set(own.vocabulary.names)


def test_a_segmenter_export_takes_typed_names(exported, tmp_path):
    from segmentors import load_student as load_segmenter
    from segmentors import recipe as segmentation

    teacher, _, images = exported
    world = images[0].parents[3]
    run = tmp_path / "seg"
    cfg = load_config(REPO / "configs/shapes/seg_supervised.yaml",
                      [f"world.root={world}", *TINY, f"output_dir={run}"])
    segmentation.train(cfg, progress=False)
    assert export.main(["--run", str(run), "--output", str(tmp_path / "segmenter"),
                        "--text-encoder"]) == 0
    student = load_segmenter(tmp_path / "segmenter")
    names = ["sky", "bolt", "water"]
    typed = student.predict(images[0], names=names, threshold=0.0)
    ref = student.predict(images[0], vocabulary=embed_vocabulary(teacher, [[n] for n in names]),
                          threshold=0.0)
    assert typed["names"] == names and typed["novel"] == [False, True, False]
    np.testing.assert_array_equal(typed["labels"], ref["labels"])
