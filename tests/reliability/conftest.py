"""A tiny synthetic world and teacher shared by the reliability tests (tests/reliability/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import WorldConfig
from distill.data.synthetic import World, generate_world

REPO = Path(__file__).resolve().parents[2]
WORLD = dict(num_train=12, num_val=4, image_size=96, max_objects=3)
TEACHER = [f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
           "teacher.model=tiny_vit", "teacher.pretrained=null", "teacher.dense_short_side=0"]
EXTRACT = ["--config", str(REPO / "configs/shapes/extract.yaml"), "cache.shard_size=2",
           "cache.num_proposals=8", "cache.store_dense=true"]
STUDENT = ["--config", str(REPO / "configs/shapes/vild.yaml"), "model.image_size=96",
           "model.hidden=32", "model.fpn_channels=16", "model.box_batch_size_per_image=16",
           "model.rpn_post_nms_top_n_test=20", "train.batch_size=2", "train.log_period=1"]


class Tiny:
    """Overrides that point every tool at the tiny world (``world``), its teacher and ``root``."""

    def __init__(self, root: Path, world: World):
        self.root, self.world = root, world
        self.common = [f"world.root={root / 'world'}", *(f"world.{k}={v}" for k, v in WORLD.items()),
                       f"cache.root={root / 'cache'}", *TEACHER]

    def extract(self, name: str, *extra: str) -> list[str]:
        return [*EXTRACT, *self.common, f"cache.name={name}", *extra]

    def train(self, output_dir: Path, cache: str, *extra: str) -> list[str]:
        return [*STUDENT, *self.common, f"cache.name={cache}", f"output_dir={output_dir}", *extra]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("reliability")
    world = generate_world(WorldConfig(root=str(root / "world"), **WORLD), progress=False,
                           workers=1)
    return Tiny(root, world)


def files(directory: Path, skip: tuple[str, ...] = ("tensorboard",)) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), less the ``skip`` folders."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not set(p.relative_to(directory).parts) & set(skip)}


def temporaries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp" in p.name)
