"""Run by test_label_index.py (under paddle.distributed.launch for 2 processes): build a training set
with an npy label store and write what this rank holds to RESULT_DIR/rank<r>.json.

    label_index_worker.py IMAGES LABELS RESULT_DIR
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from passl.utils.cpu_threads import configure_cpu_threads  # noqa: E402

configure_cpu_threads()


def main(images, labels, result_dir):
    from passl.data import build_dataset
    from passl.utils import distributed as du
    du.select_device("cpu", log=None)
    du.init_distributed()
    cfg = {"dataset": {"name": "ImageFolder", "root": images},
           "label_store": {"name": "npy", "root": labels, "allow_missing": True},
           "transforms": [{"name": "RandomResizedCrop", "size": 32}]}
    dataset = build_dataset(cfg, "train", 10, (2, 2))
    report = dataset.label_check
    with open(os.path.join(result_dir, f"rank{du.rank()}.json"), "w") as f:
        json.dump({"samples": [list(s) for s in dataset.source.samples], "has_map": dataset.has_map.tolist(),
                   "from_index": report.from_index, "maps_read": report.maps_read,
                   "listed": getattr(dataset.source, "listed", None)}, f)
    return 0


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(lambda argv=None: main(*sys.argv[1:4]))
