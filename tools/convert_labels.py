"""Convert a tree of per-image label maps (e.g. the PyTorch release's .pth files) to .npy files or a packed store.

    python tools/convert_labels.py --src label_top5_train_nfnet --to npy --out labels_npy
    python tools/convert_labels.py --src label_top5_train_nfnet --to packed --out labels_packed
    python tools/convert_labels.py --src labels_npy --src-format npy --to packed --out labels_packed

A packed store is one memory-mapped labels.npy plus index.json, so a training run opens one file
instead of one per image (label_store: {name: packed, root: ...}); it is written under temporary
names and renamed when complete. Maps keep their dtype (float16 stays float16) unless --dtype says
otherwise. --coverage records what the maps cover (center_square for the published sets, full for
maps of the whole image) in a packed store.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder of <class_dir>/<stem>.<pth|npy> label maps")
    p.add_argument("--src-format", choices=["pth", "npy"], default="pth", help="file type under --src")
    p.add_argument("--to", choices=["npy", "packed"], required=True, help="store to write")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--coverage", choices=["center_square", "full"], default="center_square",
                   help="what part of the image the maps cover")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="stored dtype of a packed store (default: that of the source maps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.errors import ConfigError
    if args.dtype and args.to != "packed":
        raise ConfigError("--dtype applies to --to packed; .npy files keep the dtype of the source maps")
    from passl.utils.fileio import DirectoryLock, ensure_writable_dir, remove_stale_temporaries

    ensure_writable_dir(args.out, "--out")
    with DirectoryLock(args.out, "label conversion", "--out"):
        for path, size in remove_stale_temporaries(args.out, recursive=args.to == "npy"):
            print(f"removed {path} ({size} bytes), left by an interrupted conversion")
        return _convert(args)


def _convert(args):
    import passl  # noqa: F401  (fills the registries)
    from passl.data.label_maps import pack_label_maps, write_npy_tree
    from passl.registry import LABEL_STORES

    store = LABEL_STORES.build({"name": args.src_format, "root": args.src, "coverage": args.coverage})
    if args.to == "npy":
        count = write_npy_tree(store, args.out, progress=not args.no_progress)
        print(f"converted {count} label maps from {args.src} to .npy files under {args.out}")
    else:
        count, shape = pack_label_maps(store, args.out, dtype=args.dtype, progress=not args.no_progress)
        print(f"packed {count} label maps of shape {list(shape)} from {args.src} into {args.out} "
              f"(coverage {store.coverage})")
    return 0


if __name__ == "__main__":
    cli.run(main)
