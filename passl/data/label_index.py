"""The start-up check of every label map, kept in an index file and done by one process per machine.

Checked for every image before the first step: its map exists (or ``allow_missing``), has the
shape [2, K, H, W] of the others, holds float16/float32, finite scores and whole-number class
indices in 0..num_classes-1. The first bad map stops the run with its path and its image.

The index (``<index_dir>/labels-<id>.npz``: numpy arrays only, written to a temporary name and
renamed, read with ``allow_pickle=False``) records the sample list (paths, labels) and, per map,
its size and modification time when it was read, and its largest class index. With ``check:
cached`` (the default) the next start lists the images, stats every map (size and mtime, in
threads) and reads again only the maps that were added or whose size or mtime changed; the class
range is checked from the recorded maxima. ``check: full`` reads every map.

What the cached check cannot see: a map rewritten in place with the same size *and* the same
mtime (e.g. ``cp -p``/``rsync -t`` of another file of equal size), or a damage that changes
neither (a disk error). Maps changed less than 2 s before a check are read again at the next one,
since file-system timestamps are coarser than a nanosecond. ``check: full`` or
``tools/check_labels.py --full`` reads every map.

With several processes, on each machine the process with local rank 0 does the check and writes
the index; the others wait for it, then take the sample list and the map flags from the index
without touching the image or label trees, and every rank compares a digest of what it holds.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time

import numpy as np

from passl.data.label_maps import label_key
from passl.data.paths import PathTable
from passl.errors import DataError, PasslError
from passl.utils.fileio import atomic_path

__all__ = ["CheckReport", "check_label_maps", "shared_label_check", "index_file", "read_index", "INDEX_FORMAT"]

INDEX_FORMAT = "passl-label-index"
_VERSION = 1
_RACY_NS = 2_000_000_000      # maps modified this close to a check are read again at the next one
_UNKNOWN = -2                 # size/mtime of a map whose check did not finish: read it next time
_CHUNK = 2048                 # maps per stat task
_READ_CHUNK = 256             # maps per read task: bounds the bytes in flight (threads x chunk x map size)
_THREADS = 16                 # file reads and stats wait on the disk, not the CPU: threads overlap them

_log = logging.getLogger("passl")


@dataclasses.dataclass
class CheckReport:
    """What the start-up check found: ``has_map`` bool [n] per sample, and how it got there."""
    has_map: np.ndarray
    maps_read: int            # maps opened and checked by this process now
    from_index: bool          # True: taken from the index another process wrote
    index_path: str           # None: no index kept
    seconds: float

    @property
    def missing(self):
        return int((~self.has_map).sum())


def index_file(store, image_root, fallback_dir=None):
    """Path of the index for ``store`` over the images under ``image_root`` (None: nowhere writable).

    ``store.index_dir`` when set; else ``<label root>/.passl_index`` when the label root is writable;
    else ``fallback_dir`` (the run's output_dir)."""
    identity = json.dumps([os.path.realpath(image_root), os.path.realpath(store.root), type(store).__name__])
    name = f"labels-{hashlib.sha1(identity.encode()).hexdigest()[:16]}.npz"
    if store.index_dir:
        return os.path.join(store.index_dir, name)
    candidate = os.path.join(store.root, ".passl_index")
    if os.access(candidate if os.path.isdir(candidate) else store.root, os.W_OK):
        return os.path.join(candidate, name)
    return os.path.join(fallback_dir, ".passl_index", name) if fallback_dir else None


def _meta(source, store):
    return {"format": INDEX_FORMAT, "version": _VERSION, "image_root": os.path.realpath(source.root),
            "label_root": os.path.realpath(store.root), "store": type(store).__name__, "classes": list(source.classes)}


def read_index(path, source, store):
    """The arrays of a readable index written for ``source`` and ``store``, else None (absent, another
    dataset, another format, damaged: the check then starts afresh)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
        expected = _meta(source, store)
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        arrays["paths"] = PathTable(arrays.pop("path_data"), arrays.pop("path_offsets"))
        arrays["map_shape"] = tuple(meta["map_shape"]) if meta.get("map_shape") else None
        arrays["signature"] = meta.get("signature")
        n = len(arrays["paths"])
        if not all(arrays[k].shape == (n,) for k in ("labels", "map_size", "map_mtime", "max_class")):
            return None
        return arrays
    except Exception as e:  # noqa: BLE001 (an unreadable cache is rebuilt, never trusted)
        _log.warning(f"label-map index {path} is unreadable ({type(e).__name__}: {e}); checking every map again")
        return None


def _write_index(path, source, store, sizes, mtimes, max_class):
    signature = store.signature()
    meta = dict(_meta(source, store), map_shape=list(store.map_shape) if store.map_shape else None,
                signature=list(signature) if signature is not None else None)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
                         path_data=source.paths.data, path_offsets=source.paths.offsets,
                         labels=np.asarray(source.labels, np.int32), map_size=sizes, map_mtime=mtimes,
                         max_class=max_class)
    except OSError as e:   # a cache that cannot be written costs the next start time, nothing else
        _log.warning(f"cannot write the label-map index {path} ({e}); the next start checks every map again. "
                     "Set label_store.index_dir to a writable folder")


def _chunks(indices, size=_CHUNK):
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _run_chunks(fn, chunks, total, desc, progress, done):
    """fn(chunk) for every chunk in threads, in order of completion; ``done(chunk, result)`` per chunk.
    Stops at the first exception (the chunks already done have been passed to ``done``) and raises it."""
    bar = None
    if progress and total:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="map", dynamic_ncols=True, mininterval=1.0, smoothing=0.05)
    pool = concurrent.futures.ThreadPoolExecutor(_THREADS)
    try:
        futures = {pool.submit(fn, chunk): chunk for chunk in chunks}
        for future in concurrent.futures.as_completed(futures):
            chunk = futures[future]
            done(chunk, future.result())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def check_label_maps(source, store, num_classes, index_path=None, progress=None):
    """Check the map of every image of ``source`` in ``store`` (see the module docstring), reusing and
    updating the index at ``index_path`` (None: none). Returns a CheckReport; DataError for a bad map."""
    start, start_ns = time.perf_counter(), time.time_ns()
    paths = source.paths
    count = len(paths)
    progress = count > 20000 if progress is None else progress
    cached = read_index(index_path, source, store) if store.check_mode == "cached" else None
    prev_size = np.full(count, _UNKNOWN, np.int64)
    prev_mtime, prev_top = prev_size.copy(), np.full(count, -1, np.int32)
    if cached is not None:
        if store.map_shape is None or cached["map_shape"] == store.map_shape:
            store.map_shape = cached["map_shape"]
            rows = _align(cached["paths"], paths)
            known = rows >= 0
            prev_size[known] = cached["map_size"][rows[known]]
            prev_mtime[known] = cached["map_mtime"][rows[known]]
            prev_top[known] = cached["max_class"][rows[known]]

    def keys_of(chunk):
        if chunk.size and chunk[-1] - chunk[0] == chunk.size - 1:   # a contiguous range: one decode
            return [label_key(rel) for rel in paths.strings(int(chunk[0]), int(chunk[-1]) + 1)]
        return [label_key(paths[i]) for i in chunk]

    sizes, mtimes = np.full(count, -1, np.int64), np.full(count, -1, np.int64)

    def stat_done(chunk, result):
        sizes[chunk], mtimes[chunk] = result

    signature = store.signature()
    if (cached is not None and signature is not None and cached["signature"] == list(signature)
            and _same(cached["paths"], paths) and (prev_size != _UNKNOWN).all()):
        sizes, mtimes = prev_size.copy(), prev_mtime.copy()    # one file, unchanged: nothing to stat
    else:
        _run_chunks(lambda chunk: store.stat(keys_of(chunk)), _chunks(np.arange(count)), count,
                    "label maps: stat", progress, stat_done)
    present = sizes >= 0
    differs = (sizes != prev_size) | (mtimes != prev_mtime)
    changed = present & differs
    top = np.where(present & ~changed, prev_top, -1).astype(np.int32)
    unread = changed.copy()     # maps whose check has not finished: not trusted by the next start

    def validate_done(chunk, result):
        top[chunk] = result
        unread[chunk] = False

    def write_index():
        if index_path and (cached is None or differs.any() or not _same(cached["paths"], paths)):
            record = unread | (mtimes >= start_ns - _RACY_NS)
            _write_index(index_path, source, store, np.where(record, _UNKNOWN, sizes),
                         np.where(record, _UNKNOWN, mtimes), top)

    if not present.all() and not store.allow_missing:   # before reading any map: a wrong root fails fast
        write_index()
        first = int(np.flatnonzero(~present)[0])
        more = int((~present).sum()) - 1
        key = label_key(paths[first])
        raise DataError(f"no label map for image {source.image_path(first)}: looked for {store.path(key)}"
                        + (f" ({more} more images have none)" if more else "") + ". Point label_store.root at the "
                        "label-map folder, or set label_store.allow_missing: true to train such images on their "
                        "image label")
    todo = np.flatnonzero(changed)
    try:
        _run_chunks(lambda chunk: store.validate(keys_of(chunk), [source.image_path(i) for i in chunk]),
                    _chunks(todo, _READ_CHUNK), todo.size, "label maps: check", progress, validate_done)
    finally:
        write_index()   # what was checked stays checked, also when a bad map stopped the check
    _check_class_range(top, num_classes, source, store)
    return CheckReport(present, int(todo.size), False, index_path, time.perf_counter() - start)


def _same(a, b):
    return a is b or a == b


def _align(old, new):
    """Row of each path of ``new`` in ``old`` (-1: not there): int64 [len(new)]."""
    if _same(old, new):
        return np.arange(len(new))
    rows = {path: row for row, path in enumerate(old)}
    return np.array([rows.get(path, -1) for path in new], np.int64)


def _check_class_range(top, num_classes, source, store):
    bad = np.flatnonzero(top >= num_classes)
    if bad.size:
        first = int(bad[0])
        raise DataError(f"label map {store.path(label_key(source.paths[first]))} (image {source.image_path(first)}) "
                        f"holds class index {int(top[first])}, outside 0..{num_classes - 1}"
                        + (f" ({bad.size - 1} more maps do too)" if bad.size > 1 else "")
                        + "; is it a map for this dataset and num_classes?")


def shared_label_check(source, store, num_classes, fallback_dir=None, progress=None):
    """``check_label_maps`` done once per machine: local rank 0 checks and writes the index, the other
    processes read the sample list and the flags from it. One process: ``check_label_maps``."""
    from passl.utils import distributed as du
    path = index_file(store, source.root, fallback_dir)
    import paddle
    import paddle.distributed as dist
    if du.world_size() == 1 or not dist.is_initialized():   # one process, or one outside the run's group
        return check_label_maps(source, store, num_classes, path, progress)
    scanner = du.local_rank() == 0 or path is None or not hasattr(source, "adopt")
    report, error = None, None
    if scanner:
        try:
            report = check_label_maps(source, store, num_classes, path, progress)
        except PasslError as e:
            error = e
    failed = du.all_reduce(paddle.to_tensor([int(error is not None)], dtype="int64"), "max")   # also the wait
    if error is not None:
        raise error
    if int(failed.numpy()[0]):
        raise DataError("the label-map check failed on another process; its log (log/workerlog.N) says why")
    if report is None:
        report = _adopt_index(source, store, num_classes, path)
    digest = _digest(source, report.has_map)
    spread = du.all_reduce(paddle.to_tensor([digest, -digest], dtype="int64"), "max").numpy()
    if spread[0] != -spread[1]:
        raise DataError(f"the processes of this run see different training sets under {source.root} (or label "
                        f"maps under {store.root}): is the data the same on every machine?")
    return report


def _adopt_index(source, store, num_classes, path):
    """Take the sample list and map flags from the index the checking process just wrote."""
    start = time.perf_counter()
    cached = read_index(path, source, store)
    if cached is None:
        _log.warning(f"label-map index {path} not readable here; checking the maps in this process too")
        return check_label_maps(source, store, num_classes, None)
    source.adopt(cached["paths"], cached["labels"])
    store.map_shape = cached["map_shape"]
    has_map = cached["map_size"] != -1
    _check_class_range(np.where(has_map, cached["max_class"], -1), num_classes, source, store)
    return CheckReport(has_map, 0, True, path, time.perf_counter() - start)


def _digest(source, has_map):
    """64-bit digest of the sample list and the map flags (equal on every process of a run)."""
    h = hashlib.blake2b(digest_size=8)
    for array in (source.paths.offsets, source.paths.data, np.asarray(source.labels, np.int32), has_map):
        h.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)
