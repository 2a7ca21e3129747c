"""Pack per-image label maps into one memory-mapped file plus an index (labels.npy + index.json).

    python tools/pack_labels.py --src label_top5_train_nfnet_npy --out labels_packed [--format npy]

A training run then opens one file instead of one per image (label_store: {name: packed, root: ...}).
The files are written under temporary names and renamed when complete.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder of <class_dir>/<stem>.npy (or .pth) label maps")
    p.add_argument("--format", choices=["npy", "pth"], default="npy", help="file type under --src")
    p.add_argument("--out", required=True, help="output folder (gets labels.npy and index.json)")
    p.add_argument("--coverage", choices=["center_square", "full"], default="center_square",
                   help="what part of the image the maps cover (recorded in the index)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="stored dtype (default: that of the source maps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import passl  # noqa: F401  (fills the registries)
    from passl.data.label_maps import pack_label_maps
    from passl.registry import LABEL_STORES

    store = LABEL_STORES.build({"name": args.format, "root": args.src, "coverage": args.coverage})
    count, shape = pack_label_maps(store, args.out, dtype=args.dtype, progress=not args.no_progress)
    print(f"packed {count} label maps of shape {list(shape)} from {args.src} into {args.out} "
          f"(coverage {store.coverage})")
    return 0


if __name__ == "__main__":
    cli.run(main)
