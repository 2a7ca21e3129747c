"""Check every label map of a config's training set, as training does at start, and keep the index.

    python tools/check_labels.py -c configs/lvvit/lvvit_tiny.yaml            # reads maps changed since the last check
    python tools/check_labels.py -c configs/lvvit/lvvit_tiny.yaml --full     # reads every map

A map that is missing (unless allow_missing), of another shape, not float16/float32, holding NaN or
inf, or class indices that are negative, fractional or >= model.num_classes stops the check with its
path and its image. The index it writes is the one training reuses, so running this once after
making or copying the maps makes the first training start as fast as later ones.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]))
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--full", action="store_true", help="read every map, not only those changed since the last check")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import passl  # noqa: F401  (registers the datasets and label stores)
    from passl.config import load_config
    from passl.data.label_index import check_label_maps, index_file
    from passl.errors import ConfigError
    from passl.registry import DATASETS, LABEL_STORES

    cfg = load_config(args.config, args.override)
    split = cfg["data"][args.split]
    if not split.get("dataset") or not split.get("label_store"):
        raise ConfigError(f"data.{args.split} has no dataset or no label_store: there are no label maps to check")
    store_cfg = dict(split["label_store"], check="full") if args.full else split["label_store"]
    store = LABEL_STORES.build(store_cfg)
    source = DATASETS.build(split["dataset"])
    report = check_label_maps(source, store, cfg["model"]["num_classes"], index_file(store, source.root,
                                                                                       cfg["output_dir"]),
                              progress=not args.no_progress)
    print(f"{len(report.has_map)} images, {report.missing} without a map; {report.maps_read} maps read, "
          f"{len(report.has_map) - report.missing - report.maps_read} unchanged since the last check "
          f"({report.seconds:.1f} s); index: {report.index_path or 'none (no writable place)'}")
    return 0


if __name__ == "__main__":
    cli.run(main)
