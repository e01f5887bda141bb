"""Stage fingerprints (ovdistill/stages.py): a stage's directory names what it reads, no more."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from distill.config import (
    BagConfig,
    ExperimentConfig,
    LossConfig,
    SegmenterConfig,
    TrainConfig,
    load_config,
    non_defaults,
)
from ovdistill import stages
from ovdistill.pipeline import STAGE_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "configs/shapes/pipeline.yaml"
CACHE = ["cache.proposals=proposals_train.safetensors", "cache.name=shapes_rpn-0",
         "cache.num_proposals=32"]  # what the extraction stage hands the distilled student


def main_job_fingerprints(schema: type = ExperimentConfig, overrides: list[str] = ()) -> dict:
    """stage -> fingerprint of each trained stage of the main job on the embedded world, its
    configs made as ovdistill/pipeline.py makes them."""
    def configure(stage: str, extra: list[str]):
        return load_config(MAIN, [*overrides, *STAGE_OVERRIDES.get(stage, []), *extra], schema)

    main = configure("vild", [])
    seg = load_config(REPO / main.pipeline.segmenter, list(overrides), schema)
    return {"vild_text": stages.fingerprint(configure("vild_text", []), stages.DETECTOR_SECTIONS),
            "vild": stages.fingerprint(configure("vild", CACHE), stages.DETECTOR_SECTIONS),
            "seg_distill": stages.fingerprint(seg, stages.SEGMENTER_SECTIONS)}


def test_non_defaults_by_hand():
    loss = LossConfig(bag=1.0, vild_image=0.5, bags=BagConfig(queue=8))
    assert non_defaults(loss) == {"bag": 1.0, "bags": {"queue": 8}}
    assert non_defaults(LossConfig()) == {}
    # against recorded defaults: bag 1.0 was the default then, vild_image 0.25
    assert non_defaults(loss, {"bag": 1.0, "vild_image": 0.25}) == {
        "vild_image": 0.5, "bags": {"queue": 8}}


def test_a_new_field_left_at_its_default_changes_no_fingerprint_of_the_main_job():
    def grown(cls, name, default):
        return dataclasses.make_dataclass(cls.__name__, [(name, type(default), default)],
                                          bases=(cls,))

    new_loss = grown(LossConfig, "new_weight", 0.0)
    new_seg = grown(SegmenterConfig, "new_switch", False)
    new_train = grown(TrainConfig, "new_period", 7)
    schema = dataclasses.make_dataclass("ExperimentConfig", [
        ("loss", new_loss, dataclasses.field(default_factory=new_loss)),
        ("seg", new_seg, dataclasses.field(default_factory=new_seg)),
        ("train", new_train, dataclasses.field(default_factory=new_train))],
        bases=(ExperimentConfig,))
    before = main_job_fingerprints()
    assert len(set(before.values())) == 3
    assert main_job_fingerprints(schema) == before
    # the new field set away from its default does change the stages that read it
    changed = main_job_fingerprints(schema, ["loss.new_weight=1.0"])
    assert changed["seg_distill"] == before["seg_distill"]
    assert changed["vild_text"] != before["vild_text"] and changed["vild"] != before["vild"]


def test_each_task_fingerprints_only_its_own_sections():
    before = main_job_fingerprints()
    seg_only = main_job_fingerprints(overrides=["seg.pixel_distill=2.0"])
    assert {k: v for k, v in seg_only.items() if k != "seg_distill"} == {
        k: v for k, v in before.items() if k != "seg_distill"}
    assert seg_only["seg_distill"] != before["seg_distill"]
    detector_only = main_job_fingerprints(overrides=["loss.vild_image=0.3", "model.hidden=48"])
    assert detector_only["seg_distill"] == before["seg_distill"]
    assert detector_only["vild"] != before["vild"]
    shared = main_job_fingerprints(overrides=["train.seed=3"])
    assert all(shared[k] != before[k] for k in before)
    # what no stage reads (the run's name, where it writes, the pipeline's own switches)
    assert main_job_fingerprints(overrides=["name=other", "output_dir=elsewhere",
                                            "pipeline.pictures=2"]) == before


def test_a_changed_default_changes_the_fingerprint_of_the_stages_that_used_it(
        tmp_path, monkeypatch):
    """The defaults a fingerprint is taken against are the recorded ones: had ``loss.box_reg``
    defaulted to 2 when they were recorded, a stage at today's 1 would be another stage."""
    before = main_job_fingerprints()
    recorded = yaml.safe_load(stages.DEFAULTS_FILE.read_text())
    assert recorded["loss"]["box_reg"] == LossConfig().box_reg == 1.0
    recorded["loss"]["box_reg"] = 2.0
    (tmp_path / "defaults.yaml").write_text(yaml.safe_dump(recorded))
    monkeypatch.setattr(stages, "DEFAULTS_FILE", tmp_path / "defaults.yaml")
    after = main_job_fingerprints()
    assert after["vild_text"] != before["vild_text"] and after["vild"] != before["vild"]
    assert after["seg_distill"] == before["seg_distill"]


def test_the_recorded_defaults_name_every_section_a_stage_reads():
    recorded = yaml.safe_load(stages.DEFAULTS_FILE.read_text())
    assert set(stages.DETECTOR_SECTIONS) | set(stages.SEGMENTER_SECTIONS) <= set(recorded)
    assert non_defaults(ExperimentConfig().loss, recorded["loss"]) == {}
