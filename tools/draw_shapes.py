"""Write a few fresh shapes images as PNG files, with their captions (not in any packed split), e.g. to try
caption.py on; `make demo` runs it. The dataset itself is the library module satkit/data/shapes.py.

    python -m tools.draw_shapes --out-dir runs/shapes/samples --count 4
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Sequence

from satkit.data.shapes import DEFAULT_IMAGE_SIZE, MIN_IMAGE_SIZE, generate_image, shape_filename
from satkit.infra.runtime import run_cli
from satkit.validation import check_fields, option


@dataclass
class DrawOptions:
    """The command line of `python -m tools.draw_shapes`: one field per flag, with its default and bounds."""

    out_dir: str = option()  # folder for shapes_NNNNNN.png
    count: int = option(4, min=1, max=100_000)  # number of images
    seed: int = option(12345, min=0, max=2**63 - 1)  # differs from the packed data's 0: fresh images
    image_size: int = option(DEFAULT_IMAGE_SIZE, min=MIN_IMAGE_SIZE, max=2048)  # side in pixels


def main(argv: Sequence[str] | None = None) -> int:
    """Write a few fresh shapes images as PNG files (not in any packed split), e.g. to try caption.py."""
    parser = argparse.ArgumentParser(description="Write fresh shapes images as PNG files, with their captions.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="folder for shapes_NNNNNN.png")
    parser.add_argument("--count", type=int, help="number of images")
    parser.add_argument("--seed", type=int, help="differs from the packed data's 0: images not in any split")
    parser.add_argument("--image-size", type=int, help="side in pixels")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    parser.set_defaults(**{f.name: f.default for f in fields(DrawOptions) if f.default is not MISSING})
    args = parser.parse_args(argv)
    options = DrawOptions(**{f.name: getattr(args, f.name) for f in fields(DrawOptions)})

    def body() -> int:
        check_fields(options, as_flags=True)
        os.makedirs(options.out_dir, exist_ok=True)
        for index in range(options.count):
            image, _, captions, _ = generate_image(options.seed, index, options.image_size)
            path = os.path.join(options.out_dir, shape_filename(index))
            image.save(path)
            print(f"{path}: {' '.join(captions[0])}")
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
