import json
from pathlib import Path

import pytest

from ovdistill import ablations
from tools import pipeline

REPO = Path(__file__).resolve().parents[1]

# a random tiny ResNet teacher: the tower students start from its tower
TINY = ["world.num_train=8", "world.num_val=4", "world.image_size=96", "world.max_objects=3",
        "teacher.model=tiny_rn", "teacher.model_config=configs/shapes/teacher/tiny_rn.json",
        "teacher.pretrained=null", "teacher.dense_short_side=0", "train.max_iters=2",
        "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16", "model.rpn_post_nms_top_n_test=20",
        "seg.name=seg_r10_fpn", "seg.norm=gn"]  # the scratch segmenter: a quicker stage


def test_pipeline_runs_every_stage_then_reuses_them(tmp_path, capsys):
    args = ["--no-progress", f"output_dir={tmp_path / 'out'}", f"world.root={tmp_path / 'world'}",
            f"cache.root={tmp_path / 'cache'}", *TINY]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "synthetic world" in out and "generated" in out and "zero-shot top-1" in out
    assert "| ViLD-text |" in out and "| ViLD |" in out and "| pixel-distilled student |" in out
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert set(summary["students"]) == {"vild_text", "vild"}
    assert 0 <= summary["segmenter"]["mIoU_novel"] <= 1
    assert 0 <= summary["teacher"]["zero_shot"]["top1_novel"] <= 1
    assert (tmp_path / "out/config.yaml").is_file()
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert stages == ["export", "pictures", "report", "seg", "vild", "vild_text"]
    assert (tmp_path / "out/report.md").is_file()
    assert [p.name.split("-")[0] for p in (tmp_path / "out/seg").iterdir()] == ["seg_distill"]
    proposals = list((tmp_path / "out").glob("vild_text-*/proposals_train.safetensors"))
    assert len(proposals) == 1
    assert pipeline.main(args) == 0  # second run: every stage reused
    out = capsys.readouterr().out
    assert "reused from cache" in out and "vild_text: reusing" in out and "vild: reusing" in out
    assert "seg_distill: reusing" in out
    assert "extracted 0 images" in out


def test_pipeline_config_typo_is_one_line(tmp_path, capsys):
    assert pipeline.main([f"output_dir={tmp_path}", "world.sed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: override 'world.sed=1': unknown config key 'world.sed'; "
                   "did you mean 'world.seed'?")
    assert not (tmp_path / "config.yaml").exists()


def test_ablation_runs_every_method_per_seed_and_writes_the_table(tmp_path, capsys):
    from tools import ablation

    results = tmp_path / "results.md"
    results.write_text("# Results\n\nkept above\n\n<!-- ablation -->\nold\n<!-- /ablation -->\n"
                       "\nkept below\n")
    args = ["--no-progress", "--seeds", "0", "1", "--results", str(results),
            f"output_dir={tmp_path / 'out'}", f"world.root={tmp_path / 'world'}",
            f"cache.root={tmp_path / 'cache'}", *TINY]
    assert ablation.main(args) == 0
    out = capsys.readouterr().out
    for label in ("ViLD-text", "ViLD-image", "ViLD", "ViLD-ensemble", "ViLD-text on the tower",
                  "ViLD on the tower", "F-VLM (frozen tower, fused)", "teacher on proposals"):
        assert f"| {label} |" in out
    saved = json.loads((tmp_path / "out/ablation.json").read_text())
    assert set(saved["seeds"]) == {"0", "1"}
    assert set(saved["seeds"]["1"]) == set(ablations.METHODS)
    for m in ablations.METHODS:  # the mean row is the mean of the seeds
        want = (saved["seeds"]["0"][m]["AP50_novel"] + saved["seeds"]["1"][m]["AP50_novel"]) / 2
        assert abs(saved["mean"][m]["AP50_novel"] - want) < 1e-12
    text = results.read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.endswith("\nkept below\n")
    assert "old" not in text and text.count("<!-- ablation -->") == 1
    assert "python -m tools.ablation --no-progress --seeds 0 1" in text
    assert "World seed 1:" in text and "images/s / teacher-on-proposals images/s |" in text
    # the ViLD student's 3-name measure, with the default scoring and with ViLD's softmax
    for seed in ("0", "1"):
        few = saved["seeds"][seed]["vild"]["few_names"]
        assert set(few) == {"reference", "softmax"} and few["reference"]["subsets"] == 18
        assert few["softmax"]["subsets"] == 6
    assert "| 1 | softmax |" in text and "3-name AP50 / all-names AP50" in text
    # the worlds differ by seed; both seeds' stages sit side by side
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert stages == sorted(["vild_text", "vild_image", "vild", "vild_ensemble", "vild_text_tower",
                             "vild_tower", "vild_ensemble_tower", "baron_tower", "fvlm"] * 2)
    wall = next(line for line in text.splitlines() if line.startswith("| ablation wall time"))
    assert wall.endswith("| <= 45 | PASS |")  # nothing reused: the tiny run is timed
    # a rerun reuses every stage: its wall time says nothing about the floor
    assert ablation.main(args) == 0
    text = results.read_text()
    assert "| n/a: stages reused |" in text and "0/teacher, 1/vild_text" in text


def test_ablation_floors_hand_computed():

    def row(novel, speed=10.0):
        return {"AP50_novel": novel, "AP50_base": 0.5, "AP50_all": 0.4, "AP": 0.2,
                "images_per_s": speed}

    mean = {"vild_text": row(0.10), "vild_image": row(0.2), "vild": row(0.25, 30.0),
            "vild_ensemble": row(0.24), "vild_text_tower": row(0.22), "vild_tower": row(0.28, 25.0),
            "vild_ensemble_tower": row(0.27), "baron_tower": row(0.275), "fvlm": row(0.29, 25.0),
            "teacher": row(0.30, 1.0)}
    seeds = {0: {"vild_text_tower": row(0.20), "vild_tower": row(0.30)},
             1: {"vild_text_tower": row(0.24), "vild_tower": row(0.26)}}
    got = [(what, round(v, 4), ok)
           for what, v, _, ok in ablations.ablation_floors(mean, 50 * 60, seeds)]
    # the best student is F-VLM (0.29 / 0.30), the better second score on the tower too
    assert [g[1:] for g in got] == [(0.9667, True), (6.0, True), (2.0, True), (-1.0, False),
                                    (1.0, True), (25.0, True), (50.0, False)]
    assert "F-VLM" in got[0][0] and "F-VLM" in got[4][0] and "ResNet-10" in got[3][0]
    mean["fvlm"] = row(0.1)  # now the ensemble on the tower is the better, 1 point short
    got = ablations.ablation_floors(mean, 50 * 60, seeds)
    assert "ViLD on the tower" in got[0][0] and "ViLD-ensemble on the tower" in got[4][0]
    assert got[4][1:] == pytest.approx((-1.0, ">= 0", False))
    seeds[1]["vild_tower"] = row(0.23)  # one seed where distillation loses
    assert ablations.ablation_floors(mean, 50 * 60, seeds)[2][1:] == pytest.approx(
        (-1.0, "> 0", False))


def test_few_names_floors_hand_computed(monkeypatch):
    monkeypatch.setattr("ovdistill.ablations.SCORE_THRESHOLD", 0.5)  # the exports' default cut

    def row(novel, base, ratio, unnamed):
        return {"AP50_novel": novel, "AP50_base": base, "few_over_all": ratio,
                "unnamed_per_image": {0.3: 9.0, 0.5: unnamed}}

    few = {0: {"reference": row(0.30, 0.40, 1.0, 0.1), "softmax": row(0.34, 0.38, 0.9, 2.0)},
           1: {"reference": row(0.25, 0.41, 0.9, 0.2), "softmax": row(0.26, 0.41, 0.8, 1.0)}}
    got = [(round(v, 4), target, ok) for _, v, target, ok in ablations.few_names_floors(few)]
    assert got == [(0.95, ">= 0.9", True), (0.15, "<= 0.2", True),
                   (-2.5, ">= -8.0 (seed spread)", True), (1.0, ">= -3.0 (seed spread)", True)]
    few[1]["reference"]["AP50_base"] = 0.30  # base: -4.5 points, spread 3
    assert ablations.few_names_floors(few)[3][3] is False


def test_seed_workers_end_when_the_ablation_is_killed(tmp_path):
    """run_seeds' spawned workers exit once their parent is gone (a killed tools.ablation),
    instead of training on into the stage directories."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        "def fn(overrides, out, progress):\n"
        "    (out / str(os.getpid())).write_text('')\n"
        "    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    code = ("import sys; from pathlib import Path; import sleeper; "
            "from ovdistill.ablations import run_seeds; "
            "run_seeds(sleeper.fn, [['a'], ['b']], Path(sys.argv[1]), False, jobs=2)")
    out = tmp_path / "out"
    out.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in out.iterdir()]
    assert len(workers) == 2, "the two seed workers never started"

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"  # a zombie has ended

    assert all(alive(w) for w in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if alive(w)]
    for w in left:  # leave nothing behind, then fail
        os.kill(w, signal.SIGKILL)
    assert not left, f"seed workers {left} outlived the killed parent"
