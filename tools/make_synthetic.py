"""Generate (or reuse) the embedded synthetic world and print its summary.

    python -m tools.make_synthetic                      # configs/shapes/world.yaml
    python -m tools.make_synthetic world.num_train=100 world.novel=[star,ring]
"""

from __future__ import annotations

import sys

from distill.data.synthetic import generate_world, summarize

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/world.yaml")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    world = generate_world(cli.load(args).world, progress=not args.no_progress)
    print(summarize(world))
    print(world.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
