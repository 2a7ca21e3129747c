"""Build the offline example dataset: scenes of real handwritten digits in an ImageNet-layout folder.

    python tools/make_example.py --out data/digit_scenes [--seed 0] [--train-per-class 300]
                                 [--val-per-class 50] [--image-size 80 64] [--force]

The digits are scikit-learn's bundled copy of the UCI handwritten digits (pip install -e .[example]);
nothing is downloaded. Running it again with the same arguments finds the dataset and exits at once.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    from passl.example import scenes

    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="data/digit_scenes", help="dataset folder to create")
    p.add_argument("--seed", type=cli.number(0), default=0, help="every image is a function of this seed")
    p.add_argument("--train-per-class", type=cli.number(1), default=scenes.DEFAULT_TRAIN_PER_CLASS,
                   help="training scenes per class (10 classes)")
    p.add_argument("--val-per-class", type=cli.number(1), default=scenes.DEFAULT_VAL_PER_CLASS,
                   help="validation scenes per class")
    p.add_argument("--image-size", type=cli.number(24), nargs=2, default=list(scenes.DEFAULT_IMAGE_SIZE),
                   metavar=("W", "H"), help="scene width and height in pixels")
    p.add_argument("--force", action="store_true", help="replace a different dataset already at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.example.scenes import build_digit_scenes
    from passl.utils.fileio import ensure_writable_dir

    if args.force or not os.path.isdir(args.out):   # a finished set is found and kept; a new one is built beside --out
        ensure_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")

    build_digit_scenes(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                       image_size=tuple(args.image_size), seed=args.seed, force=args.force,
                       progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    cli.run(main)
