import pytest

from distill.config import ConfigError, ExperimentConfig, load_config, save_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_base_file_and_overrides_merge_in_order(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  max_iters: 300\n  optim:\n    lr: 0.1\nworld:\n  seed: 3\n")
    exp = write(tmp_path / "exp.yaml", "base: base.yaml\nname: exp\ntrain:\n  optim:\n    lr: 0.2\n")
    cfg = load_config(exp, ["train.batch_size=8", "world.novel=[star,ring]"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "exp"
    assert cfg.train.max_iters == 300  # from base
    assert cfg.train.optim.lr == 0.2  # file beats base
    assert cfg.world.seed == 3
    assert cfg.train.batch_size == 8  # override beats file
    assert cfg.world.novel == ["star", "ring"]
    assert cfg.train.optim.momentum == 0.9  # untouched default
    assert load_config(exp, ["train.optim.lr=0.5"]).train.optim.lr == 0.5


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=5",
     "override 'train.max_iter=5': unknown config key 'train.max_iter'; did you mean 'train.max_iters'?"),
    ("world.num_trian=3",
     "override 'world.num_trian=3': unknown config key 'world.num_trian'; did you mean 'world.num_train'?"),
    ("train.optim.lrr=1",
     "override 'train.optim.lrr=1': unknown config key 'train.optim.lrr'; did you mean 'train.optim.lr'?"),
    ("loss.distill_min_objectness=0.3",  # read by the training set, not the criterion
     "override 'loss.distill_min_objectness=0.3': unknown config key "
     "'loss.distill_min_objectness'; it moved to 'data.distill_min_objectness'"),
])
def test_unknown_override_names_key_and_closest(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_unknown_key_in_file_names_file_and_closest(tmp_path):
    path = write(tmp_path / "typo.yaml", "train:\n  batch_szie: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: unknown config key 'train.batch_szie'; "
                            "did you mean 'train.batch_size'?")


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_iters=abc"])
    msg = str(e.value)
    assert "'train.max_iters'" in msg and "'abc'" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'world.num_train'"):
        load_config(None, ["world.num_train=[1,2]"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override 'train.max_iters' is neither key=value "
                                          "nor a .yaml file"):
        load_config(None, ["train.max_iters"])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(None, [str(tmp_path / "nope.yaml")])
    write(tmp_path / "a.yaml", "base: sub/b.yaml\n")
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: a cycle of base configs \(.*a.yaml -> "
                                          r".*sub/b.yaml -> .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: [x.yaml]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'base' must be one file name"):
        load_config(tmp_path / "c.yaml")


def test_bases_chain_to_any_depth_nearest_winning(tmp_path):
    """exp -> mid (in another folder, its base named relative to itself) -> root: each file
    beats the ones it names, the defaults lose to all."""
    write(tmp_path / "root.yaml", "train:\n  max_iters: 7\n  optim:\n    lr: 0.1\n"
                                  "world:\n  seed: 3\n")
    write(tmp_path / "sets" / "mid.yaml", "base: ../root.yaml\ntrain:\n  optim:\n    lr: 0.2\n"
                                          "world:\n  num_val: 9\n")
    exp = write(tmp_path / "sets" / "exp.yaml", "base: mid.yaml\nworld:\n  num_val: 11\n")
    cfg = load_config(exp)
    assert (cfg.train.max_iters, cfg.world.seed) == (7, 3)  # from root
    assert cfg.train.optim.lr == 0.2  # mid beats root
    assert cfg.world.num_val == 11  # the file beats its bases
    assert cfg.train.batch_size == load_config(None).train.batch_size  # the default


def test_a_yaml_file_among_the_overrides_merges_where_it_stands(tmp_path):
    """``--config exp.yaml schedule.yaml key=value``: the file beats the config, a later
    key=value beats the file, an earlier one loses to it; its own base: chain comes along."""
    exp = write(tmp_path / "exp.yaml", "train:\n  max_iters: 7\n  batch_size: 3\n")
    write(tmp_path / "sched_base.yaml", "train:\n  log_period: 5\n")
    sched = write(tmp_path / "sched.yaml", "base: sched_base.yaml\ntrain:\n  max_iters: 70\n"
                                           "  schedule:\n    steps: [50, 60]\n")
    cfg = load_config(exp, ["train.schedule.steps=[1]", str(sched), "train.batch_size=4"])
    assert cfg.train.max_iters == 70 and cfg.train.schedule.steps == [50, 60]
    assert (cfg.train.batch_size, cfg.train.log_period) == (4, 5)
    with pytest.raises(ConfigError, match=r"sched_bad.yaml: unknown config key 'train.max_iter'"):
        load_config(exp, [str(write(tmp_path / "sched_bad.yaml", "train:\n  max_iter: 1\n"))])


def test_resolved_config_round_trip(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  schedule:\n    steps: [10, 20]\n")
    exp = write(tmp_path / "exp.yaml", "base: base.yaml\nteacher:\n  pretrained: /x/y.pt\n")
    cfg = load_config(exp, ["world.num_val=7", "train.optim.betas=[0.8,0.9]"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert again.train.schedule.steps == [10, 20] and again.teacher.pretrained == "/x/y.pt"
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "config.yaml"]  # no temp left
