"""The example end to end: annotator, dense labels, LV-ViT with and without token labeling, a table.

    python tools/demo.py                       (or: make demo)
    python tools/demo.py --data data/digit_scenes --out output/demo

Offline and CPU-only friendly; builds data/digit_scenes first if it is not there.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default="data/digit_scenes", help="example dataset folder (built if absent)")
    p.add_argument("--out", default="output/demo", help="where models, label maps and results.json go")
    p.add_argument("--train-per-class", type=cli.number(1), help="default: the example builder's")
    p.add_argument("--val-per-class", type=cli.number(1), help="default: the example builder's")
    p.add_argument("--annotator-epochs", type=cli.number(1), help="default: configs/example/annotator_digits.yaml")
    p.add_argument("--epochs", type=cli.number(1), help="LV-ViT epochs (default: configs/example/lvvit_digits_tl.yaml)")
    p.add_argument("--force-data", action="store_true", help="rebuild the dataset if a different one is at --data")
    p.add_argument("--no-build", action="store_true",
                   help="use --data as it is (any folder with train/ and val/ in ImageNet layout)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.example.demo import run_demo
    from passl.utils.fileio import ensure_writable_dir

    ensure_writable_dir(args.out, "--out")
    if not args.no_build and not os.path.isdir(args.data):   # the example set is built beside --data
        ensure_writable_dir(os.path.dirname(os.path.abspath(args.data)), "--data")
    run_demo(args.data, args.out, args.train_per_class, args.val_per_class, args.annotator_epochs, args.epochs,
             args.force_data, build_data=not args.no_build, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    cli.run(main)
