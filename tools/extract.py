"""Extract teacher region (and dense) embeddings of a dataset split into the cache.

    python -m tools.extract --config configs/shapes/extract.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m tools.extract --config ... teacher.device=cuda

Writes ``cache.root/cache.name`` (distill/cache.py) for every image of
``cache.split``: proposals per ``cache.proposals`` (distill/data/proposals.py), their
teacher embeddings (``teacher.region_mode``) and, with ``cache.store_dense``, the
dense map. Resumable: a rerun of the same command computes only the images not
stored yet. Ends with ``extract_summary.json`` and ``extract_config.yaml`` in the store
directory; with ``data.on_error=skip``, ``skipped.json`` lists the annotation records and
images left out (which are not in the store's image list).

``--verify`` instead checks the config's store: every shard's sha256 against its index
(training checks only the sizes, at each start), and says which shard is corrupt.
"""

from __future__ import annotations

import sys

from distill.extraction import extract

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/extract.yaml")
    parser.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="hash every shard of the config's store against its index; no extraction")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    if args.verify:
        from pathlib import Path

        from distill.cache import EmbeddingCache

        cache = EmbeddingCache.open(Path(cfg.cache.root) / cfg.cache.name)
        cache.verify()
        print(f"{cache.path}: {len(cache.shard_files())} shards, {len(cache)} of "
              f"{cache.num_planned} images, every sha256 as indexed")
        return 0
    extract(cfg, workers=args.workers, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
