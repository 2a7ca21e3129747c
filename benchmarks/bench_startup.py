"""Start-up at ImageNet scale: time to dataset-ready and to the first batch, and worker memory.

Builds (or reuses) a synthetic ImageNet-layout tree under ``--root`` (outside the repository): N
images in 1000 class folders (one tiny JPEG, the same bytes in every file: the scan and the first
batch need files, not photographs) and one real ``[2, 5, 15, 15]`` float16 ``.npy`` label map per
image (and, for ``--stores packed``, the same maps packed into one ``labels.npy``). Then, for each
label store, four starts, each a fresh process running the config's training set (default the
lvvit_tiny recipe) with ``--workers`` loader workers:

    first start (no index), cold page cache    first start, warm
    second start (index kept), cold            second start, warm

and reports seconds to dataset-ready (``build_dataset``: listing, the label-map check, the index)
and to the first batch, and per process after one pass over the sampler's indices (each worker
reading what ``__getitem__`` reads of every sample it is dealt: path, label and label map, without
decoding the image): RSS and USS
(private memory, from /proc/PID/smaps_rollup) of the main process and of each worker.

Cold: ``echo 3 > /proc/sys/vm/drop_caches`` when permitted; else every file of the trees is evicted
from the page cache with posix_fadvise(DONTNEED), which drops file contents but not the kernel's
cached directory entries and inodes (``cold_method`` in the JSON says which was used).

    python benchmarks/bench_startup.py --num-images 200000
    python benchmarks/bench_startup.py --num-images 1281167 --stores npy,packed --root /work/bench_data/startup
    python benchmarks/bench_startup.py --num-images 200000 --repo /path/to/other/checkout   # the same starts with other code
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup_child.py")   # one start, fresh process
CLASSES = 1000
MAP_SHAPE = (2, 5, 15, 15)
_TREE_VERSION = 1


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=200000)
    p.add_argument("--root", default="/tmp/passl_bench_startup", help="where the synthetic tree is built or reused")
    p.add_argument("--stores", default="npy,packed",
                   help="label stores to time: npy, packed; none: the config's evaluation set (no maps)")
    p.add_argument("--starts", default="first-cold,first-warm,second-cold,second-warm",
                   help="which starts to run (first = no index, second = index kept)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (the memory pass runs in them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-c", "--config", default=os.path.join(REPO, "configs/lvvit/lvvit_tiny.yaml"))
    p.add_argument("--repo", default=REPO, help="checkout whose passl is timed (default: this one)")
    p.add_argument("--no-memory-pass", action="store_true", help="skip the pass over the sampler's indices")
    p.add_argument("--remove", action="store_true", help="delete the tree at the end")
    p.add_argument("--json-out", default=None)
    return p


# -- the synthetic tree -------------------------------------------------------------------------------

def _tiny_jpeg():
    import io

    import numpy as np
    from PIL import Image
    pixels = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _map_bytes(count=16):
    """``count`` distinct float16 maps as .npy bytes (cycled over the images)."""
    import io

    import numpy as np
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        label_map = np.empty(MAP_SHAPE, np.float16)
        label_map[0] = -np.sort(-rng.gamma(2.0, 2.0, MAP_SHAPE[1:]), axis=0)
        label_map[1] = rng.integers(0, CLASSES, MAP_SHAPE[1:])
        buffer = io.BytesIO()
        np.save(buffer, label_map)
        out.append((buffer.getvalue(), label_map))
    return out


def build_tree(root, count, stores):
    """root/images/<cls>/<cls>_<i>.JPEG, root/labels/<cls>/<cls>_<i>.npy, root/packed (if asked)."""
    from tqdm import tqdm
    marker = os.path.join(root, "tree.json")
    wanted = {"version": _TREE_VERSION, "num_images": count}
    if os.path.isfile(marker) and json.load(open(marker)) == wanted:
        print(f"reusing the tree in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
        jpeg, maps = _tiny_jpeg(), _map_bytes()
        per_class = [count // CLASSES + (c < count % CLASSES) for c in range(CLASSES)]
        with tqdm(total=count, desc="write tree", unit="img", mininterval=2.0) as bar:
            for c, n in enumerate(per_class):
                name = f"n{c:08d}"
                for sub in ("images", "labels"):
                    os.makedirs(os.path.join(root, sub, name))
                for i in range(n):
                    stem = f"{name}_{i}"
                    with open(os.path.join(root, "images", name, stem + ".JPEG"), "wb") as f:
                        f.write(jpeg)
                    with open(os.path.join(root, "labels", name, stem + ".npy"), "wb") as f:
                        f.write(maps[i % len(maps)][0])
                bar.update(n)
        with open(marker, "w") as f:
            json.dump(wanted, f)
    if "packed" in stores and not os.path.isfile(os.path.join(root, "packed", "index.json")):
        write_packed(root, count)


def write_packed(root, count):
    """The packed store of the same maps, written directly (what convert_labels.py --to packed makes)."""
    import numpy as np
    sys.path.insert(0, REPO)
    from passl.data.label_maps import PACKED_DATA, PACKED_FORMAT, PACKED_INDEX
    maps = _map_bytes()
    keys = []
    per_class = [count // CLASSES + (c < count % CLASSES) for c in range(CLASSES)]
    for c, n in enumerate(per_class):
        keys.extend(f"n{c:08d}/n{c:08d}_{i}" for i in range(n))
    order = np.argsort(np.array(keys))
    os.makedirs(os.path.join(root, "packed"), exist_ok=True)
    data = np.lib.format.open_memmap(os.path.join(root, "packed", PACKED_DATA), mode="w+", dtype=np.float16,
                                     shape=(count,) + MAP_SHAPE)
    stack = np.stack([m for _, m in maps])
    for start in range(0, count, 65536):
        rows = np.arange(start, min(count, start + 65536))
        # row r holds key keys[order[r]], whose map is maps[i % 16] for its in-class index i
        index_in_class = np.array([int(keys[k].rsplit("_", 1)[1]) for k in order[rows]])
        data[rows] = stack[index_in_class % len(maps)]
    data.flush()
    del data
    with open(os.path.join(root, "packed", PACKED_INDEX), "w") as f:
        json.dump({"format": PACKED_FORMAT, "version": 1, "coverage": "center_square", "shape": list(MAP_SHAPE),
                   "dtype": "float16", "keys": sorted(keys)}, f)


def evict(root):
    """Drop the tree from the page cache; returns how."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise(DONTNEED) per file (directory entries and inodes stay cached)"


def remove_index(root, store):
    """The label-map index of ``store`` (in its folder, or in the output_dir fallback), so that the next
    start is a first one; the other store's index stays for its later starts."""
    folder = {"npy": "labels", "packed": "packed"}.get(store)
    if folder:
        shutil.rmtree(os.path.join(root, folder, ".passl_index"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, "out"), ignore_errors=True)


def run_start(args, store, start, cold_method):
    cmd = [sys.executable, CHILD, store, "--root", args.root, "--config", args.config,
           "--repo", args.repo, "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    if args.no_memory_pass or start != "second-warm":
        cmd.append("--no-memory-pass")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=4 * 3600)
    if done.returncode != 0:
        raise SystemExit(f"{store} {start} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["start"] = start
    result["cold_method"] = cold_method if start.endswith("cold") else None
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.root = os.path.abspath(args.root)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    build_tree(args.root, args.num_images, stores)
    results = []
    for store in stores:
        for start in [s.strip() for s in args.starts.split(",")]:
            if start.startswith("first"):
                remove_index(args.root, store)
            method = evict(args.root) if start.endswith("cold") else None
            result = run_start(args, store, start, method)
            results.append(result)
            print(f"{store:6s} {start:12s} dataset ready {result['dataset_ready_s']:7.1f} s, first batch "
                  f"{result['first_batch_s']:7.1f} s" + (f", maps read {result['maps_read']}" if "maps_read" in result
                                                         else ""), file=sys.stderr)
    from passl.utils.cpu_threads import cpu_model
    out = {"benchmark": "startup", "num_images": args.num_images, "root": args.root, "repo": args.repo,
           "workers": args.workers, "cpu": cpu_model(), "load_average": os.getloadavg()[0], "results": results}
    _common.emit(out, args.json_out)
    if args.remove:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
