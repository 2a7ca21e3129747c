"""One start of benchmarks/bench_startup.py, in a fresh process, with the passl of ``--repo`` (which may
be another checkout, older than passl.utils.runtime): dataset-ready and first-batch times, then the
memory of the main process and of each loader worker after a pass over the sampler's indices. Prints
one JSON line. Not run directly; bench_startup.py starts it."""
import argparse
import json
import os
import sys
import time


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="npy, packed, or none (the evaluation set)")
    p.add_argument("--root", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-memory-pass", action="store_true")
    return p


def setup_process(repo):
    """The process set-up of ``repo``'s entry points, before paddle is imported."""
    sys.path.insert(0, repo)
    try:
        from passl.utils.runtime import configure_process
    except ImportError:          # a checkout from before passl.utils.runtime
        from passl.utils.cpu_threads import configure_cpu_threads as configure_process
    configure_process()


def memory_of(pid):
    """(RSS, USS) of a process in MiB from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0) / 1024, uss / 1024


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


class _IndexPass:
    """Dataset over (index, seed) keys whose items read, for each sample, what TokenLabelDataset's
    __getitem__ reads before decoding: the image path, the label, the map flag, the map's key and the
    map itself (a packed store's reads are what could grow a worker's memory over an epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        import numpy as np

        from passl.data.label_maps import label_key
        source, dataset = self.dataset.source, self.dataset
        path = source.image_path(index)
        rel = source.samples[index][0]
        keys = getattr(dataset, "keys", None)   # earlier versions held a list of keys
        label_key(rel) if keys is None else keys[index]
        has_map = bool(dataset.has_map[index])
        if has_map:
            dataset.load_label_map(index)
        return np.array([len(path), int(source.samples[index][1]), int(has_map)], np.int64)


def child(args):
    t0 = time.perf_counter()
    import numpy as np
    import paddle
    import passl  # noqa: F401
    from passl.config import load_config
    from passl.data import build_dataset, collate_fn
    from passl.data.loader import Loader
    imported = time.perf_counter() - t0
    store = args.store
    cfg = load_config(args.config)
    name = "val" if store == "none" else "train"     # none: the evaluation set (no label maps)
    split = dict(cfg["data"][name])
    split["dataset"] = dict(split["dataset"], root=os.path.join(args.root, "images"))
    split["label_store"] = None if store == "none" else {
        "name": store, "root": os.path.join(args.root, "labels" if store == "npy" else "packed")}
    model_cfg = cfg["model"]
    paddle.set_device("cpu")
    start = time.perf_counter()
    kwargs = {"cache_dir": os.path.join(args.root, "out")} if "cache_dir" in build_dataset.__code__.co_varnames else {}
    dataset = build_dataset(split, name, model_cfg["num_classes"], (14, 14), model_cfg["img_size"], **kwargs)
    ready = time.perf_counter() - start
    loader = Loader(dataset, args.batch_size, collate_fn, num_workers=args.workers, shuffle=name == "train",
                    drop_last=name == "train")
    loader.set_epoch(0)
    batch = next(iter(loader))
    first = time.perf_counter() - start
    assert tuple(batch["image"].shape)[0] == args.batch_size
    result = {"store": store, "num_images": len(dataset), "import_s": imported, "dataset_ready_s": ready,
              "first_batch_s": first, "main_after_build": dict(zip(("rss_mb", "uss_mb"), memory_of(os.getpid())))}
    check = getattr(dataset, "label_check", None)
    if check is not None:
        result["maps_read"] = check.maps_read
    del loader, batch
    if not args.no_memory_pass:
        result.update(memory_pass(dataset, args, paddle, np))
    print(json.dumps(result))


def memory_pass(dataset, args, paddle, np):
    """Every worker reads every sample it is dealt once (one epoch of the sampler, no decoding)."""
    from passl.data.loader import ResumableDistributedBatchSampler, SeededItems
    # batches of 1024 at ImageNet scale; at least 16 batches for a small tree, so that every worker
    # has started before the first measurement and is still alive at the last one
    sampler = ResumableDistributedBatchSampler(len(dataset), max(1, min(1024, len(dataset) // 16)), shuffle=True)
    loader = paddle.io.DataLoader(SeededItems(_IndexPass(dataset)), batch_sampler=sampler,
                                  num_workers=args.workers, collate_fn=lambda items: np.stack(items))
    earlier = set(children_of(os.getpid()))     # e.g. the first-batch loader's workers, still exiting
    start = time.perf_counter()
    iterator = iter(loader)
    batches, total = 0, len(sampler)
    workers_start = workers = None
    for _ in iterator:
        batches += 1
        ours = [pid for pid in children_of(os.getpid()) if pid not in earlier]
        if batches == args.workers * 2:   # every worker has started and done a little
            workers_start = [memory_of(pid) for pid in ours]
        if batches == total - args.workers:   # the last batches: every worker has read its share
            workers = [memory_of(pid) for pid in ours]
    out = {"pass_s": time.perf_counter() - start, "pass_batches": batches,
           "main_after_pass": dict(zip(("rss_mb", "uss_mb"), memory_of(os.getpid()))),
           "workers_early": [dict(zip(("rss_mb", "uss_mb"), w)) for w in workers_start or []],
           "workers_after_pass": [dict(zip(("rss_mb", "uss_mb"), w)) for w in workers or []]}
    del iterator
    return out


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    setup_process(arguments.repo)
    child(arguments)
