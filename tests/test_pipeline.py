import json

from tools import pipeline

TINY = ["world.num_train=8", "world.num_val=4", "world.image_size=96", "world.max_objects=3",
        "teacher.model=tiny_vit", "teacher.model_config=configs/shapes/teacher/tiny_vit.json",
        "teacher.pretrained=null", "teacher.dense_short_side=0", "train.max_iters=2",
        "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16", "model.rpn_post_nms_top_n_test=20"]


def test_pipeline_runs_every_stage_then_reuses_them(tmp_path, capsys):
    args = ["--no-progress", f"output_dir={tmp_path / 'out'}", f"world.root={tmp_path / 'world'}",
            f"cache.root={tmp_path / 'cache'}", *TINY]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "synthetic world" in out and "generated" in out and "zero-shot top-1" in out
    assert "| ViLD-text |" in out and "| ViLD |" in out
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert set(summary["students"]) == {"vild_text", "vild"}
    assert 0 <= summary["teacher"]["zero_shot"]["top1_novel"] <= 1
    assert (tmp_path / "out/config.yaml").is_file()
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert stages == ["vild", "vild_text"]
    proposals = list((tmp_path / "out").glob("vild_text-*/proposals_train.safetensors"))
    assert len(proposals) == 1
    assert pipeline.main(args) == 0  # second run: every stage reused
    out = capsys.readouterr().out
    assert "reused from cache" in out and "vild_text: reusing" in out and "vild: reusing" in out
    assert "extracted 0 images" in out


def test_pipeline_config_typo_is_one_line(tmp_path, capsys):
    assert pipeline.main([f"output_dir={tmp_path}", "world.sed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: override 'world.sed=1': unknown config key 'world.sed'; "
                   "did you mean 'world.seed'?")
    assert not (tmp_path / "config.yaml").exists()
