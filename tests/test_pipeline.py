import json

from tools import pipeline


def test_pipeline_generates_world_writes_config_and_reuses_it(tmp_path, capsys):
    args = [f"output_dir={tmp_path / 'out'}", f"world.root={tmp_path / 'world'}",
            "world.num_train=12", "world.num_val=4", "world.image_size=96"]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    assert "synthetic world" in out and "generated" in out
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert (tmp_path / "out/config.yaml").is_file()
    assert summary["world"]["path"].startswith(str(tmp_path / "world"))
    assert pipeline.main(args) == 0
    assert "reused from cache" in capsys.readouterr().out


def test_pipeline_config_typo_is_one_line(tmp_path, capsys):
    assert pipeline.main([f"output_dir={tmp_path}", "world.sed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: override 'world.sed=1': unknown config key 'world.sed'; "
                   "did you mean 'world.seed'?")
    assert not (tmp_path / "config.yaml").exists()
