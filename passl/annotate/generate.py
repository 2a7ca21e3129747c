"""Dense label-map generation (SPEC 4): an annotator over every image of a folder.

Every image is resized as a whole to ``image_size`` (so the maps have ``full`` coverage),
normalised, and scored densely; each location keeps its top-K logits and class indices:
``[2, K, h, w]`` float16 per image, keyed like the label stores (``<class_dir>/<stem>``).

Resumable: a map is written to a temporary file and renamed, so a file that exists is complete,
and a rerun skips it. Data-parallel: under ``paddle.distributed.launch`` rank r takes every
world_size-th image of the sorted list. Stores: ``npy`` and ``pth`` (one file per image), ``packed``
(maps are made as an npy tree in ``out_dir/parts`` and packed into ``out_dir`` at the end).
"""
import concurrent.futures
import contextlib
import json
import os
import time

import numpy as np

from passl.data.datasets import IMG_EXTENSIONS, read_rgb
from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, Sample, pil_interpolation
from passl.errors import ConfigError, DataError
from passl.utils.fileio import TEMPORARY, DirectoryLock, atomic_path, format_bytes, sha256_file, write_text

__all__ = ["list_images", "shard", "preprocess", "topk_label_maps", "generate_label_maps", "STORES", "INFO_FILE"]

STORES = ("npy", "pth", "packed")
INFO_FILE = "label_maps.json"


def list_images(root, extensions=IMG_EXTENSIONS):
    """Sorted (store key, relative path) of every image below ``root``; key = relpath without extension."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(extensions) and not name.startswith("."):
                rel = os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
                found.append((os.path.splitext(rel)[0], rel))
    if not found:
        raise DataError(f"no images ({', '.join(extensions)}) found below {root}")
    keys = [k for k, _ in found]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise DataError(f"{root}: images that differ only in their extension share a label key: {dup}")
    return sorted(found)


def shard(items, rank, world_size):
    """This rank's share of ``items``: every world_size-th item from position ``rank``."""
    return items[rank::world_size]


def preprocess(path, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear"):
    """Decode ``path`` as RGB, resize the whole image to image_size = (W, H) (``interpolation``: a key of
    transforms.INTERPOLATIONS), normalise as the Normalize transform does.
    Returns float32 [3, H, W]; raises DataError naming the file if it cannot be decoded."""
    image = read_rgb(path).resize(tuple(image_size), pil_interpolation(interpolation))
    return Normalize(mean, std)(Sample(image=image), None).image


def topk_label_maps(logits, k=5):
    """Dense logits [B, C, h, w] (paddle) -> label maps float16 [B, 2, K, h, w] (numpy):
    ``[:, 0]`` the top-K logits per location (descending), ``[:, 1]`` their class indices as floats."""
    import paddle
    if logits.shape[1] < k:
        raise ConfigError(f"topk {k} is more than the annotator's {logits.shape[1]} classes; lower --topk")
    scores, classes = paddle.topk(logits.astype("float32"), k=k, axis=1)
    return np.stack([scores.numpy(), classes.numpy().astype(np.float32)], axis=1).astype(np.float16)


def _target(out_dir, store, key):
    if store == "packed":
        return os.path.join(out_dir, "parts", key + ".npy")
    return os.path.join(out_dir, key + (".pth" if store == "pth" else ".npy"))


def _write_atomic(path, label_map):
    """Write one map whole or not at all (an interrupted run leaves no half file to skip later)."""
    if path.endswith(".pth"):
        from passl.io.pth import save_pth
        save_pth(label_map, path)
    else:
        with atomic_path(path) as tmp:
            np.save(tmp, label_map)


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _barrier(world_size):
    if world_size > 1:
        import paddle.distributed as dist
        if not dist.is_initialized():
            dist.init_parallel_env()
        dist.barrier()


def generate_label_maps(annotator, image_root, out_dir, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, topk=5,
                        store="npy", batch_size=32, num_workers=2, skip_bad_images=False, max_images=None, rank=0,
                        world_size=1, interpolation="bilinear", progress=True, log=print):
    """Write the label map of every image below ``image_root`` into ``out_dir``.

    annotator: callable images [B, 3, H, W] (paddle, normalised) -> dense logits [B, C, h, w]; its
    ``record`` (build_cnn_annotator, build_lvvit_annotator) says what it is and which weights it has.
    image_size: (W, H) every image is resized to. Maps already in ``out_dir`` are skipped.
    Before the first map, ``out_dir/label_maps.json`` records the annotator (with the SHA-256 of its
    weights) and the settings; a later run into ``out_dir`` with another annotator or other settings is
    refused, so one folder never mixes two annotators' maps, even after a run was killed.
    skip_bad_images: an undecodable image is skipped, counted and listed; otherwise DataError names it.
    max_images: write at most this many maps in this run (this rank), then stop (resume later).
    Returns {"total", "written", "existing", "bad_images": [paths], "map_shape", "out_dir", "seconds",
    "complete" (every image of this rank has its map)}.
    """
    if store not in STORES:
        raise ConfigError(f"label store '{store}' cannot be written; use one of {', '.join(STORES)}")
    start = time.time()
    items = list_images(image_root)
    mine = shard(items, rank, world_size)
    lock = DirectoryLock(out_dir, "label generation", "--out").acquire() if rank == 0 else None
    try:
        present, stale = _scan_targets(out_dir, store, mine)
        todo = [(k, rel) for k, rel in mine if k not in present]
        existing = len(mine) - len(todo)
        weights, settings = _annotator_settings(annotator, image_size, mean, std, interpolation, topk, store, log)
        previous = _check_previous_run(out_dir, settings, existing, log)
        if rank == 0:   # recorded before the first map, so that a killed run leaves its annotator named
            _write_info(out_dir, image_root, settings, previous.get("map_shape"), weights)
            lock.describe()
        for path in stale:   # temporaries of this rank's maps, left by a killed run
            with contextlib.suppress(OSError):
                os.remove(path)
        if max_images is not None:
            todo = todo[:max(0, int(max_images))]
        log(f"generate labels: {len(items)} images below {image_root}; rank {rank}/{world_size} has {len(mine)}, "
            f"{existing} already done, {len(todo)} to write -> {out_dir} ({store})")
        written, bad, map_shape = _annotate(annotator, image_root, out_dir, store, todo, image_size, mean, std,
                                            interpolation, topk, batch_size, num_workers, skip_bad_images, progress)
        map_shape = map_shape or previous.get("map_shape")
        done = existing + written + len(bad) == len(mine)
        if store == "packed":
            _barrier(world_size)
            if rank == 0 and done:
                _pack(out_dir, items, progress)
        if rank == 0:
            _write_info(out_dir, image_root, settings, map_shape, weights)
    finally:
        if lock is not None:
            lock.release()
    summary = {"total": len(items), "written": written, "existing": existing, "bad_images": bad,
               "map_shape": map_shape, "out_dir": out_dir, "seconds": round(time.time() - start, 2),
               "complete": done}
    if bad:
        log(f"skipped {len(bad)} undecodable image(s):\n  " + "\n  ".join(bad))
    log(f"label maps: wrote {written}, kept {existing} already there, skipped {len(bad)} bad, "
        f"{len(mine) - existing - written - len(bad)} left for a later run; shape {map_shape}, "
        f"coverage full, in {summary['seconds']:.1f} s -> {out_dir}")
    return summary


def _annotate(annotator, image_root, out_dir, store, todo, image_size, mean, std, interpolation, topk, batch_size,
              num_workers, skip_bad_images, progress):
    """Write the maps of ``todo``; returns (written, bad image paths, map shape or None)."""
    import paddle
    written, bad, map_shape = 0, [], None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="label maps", unit="img", dynamic_ncols=True, mininterval=1.0)

    def load(item):
        path = os.path.join(image_root, item[1])
        try:
            return preprocess(path, image_size, mean, std, interpolation)
        except DataError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        batches = list(_batches(todo, batch_size))
        pending = pool.map(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            decoded = list(pending)
            if i + 1 < len(batches):   # decode the next batch while this one runs
                pending = pool.map(load, batches[i + 1])
            good = []
            for item, result in zip(batch, decoded):
                if isinstance(result, DataError):
                    if not skip_bad_images:
                        raise DataError(f"{result}. Replace or remove the file, or pass --skip-bad-images "
                                        "to skip such images (they are listed at the end)")
                    bad.append(os.path.join(image_root, item[1]))
                else:
                    good.append((item, result))
            if good:
                images = paddle.to_tensor(np.stack([g[1] for g in good]))
                maps = topk_label_maps(annotator(images), topk)
                map_shape = list(maps.shape[1:])
                for (key, _), label_map in zip([g[0] for g in good], maps):
                    _write_atomic(_target(out_dir, store, key), label_map)
                written += len(good)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return written, bad, map_shape


def _scan_targets(out_dir, store, items):
    """(keys of ``items`` whose map exists, temporaries of those maps left by a killed write): one
    listing per folder instead of one stat per image."""
    by_folder = {}
    for key, _ in items:
        target = _target(out_dir, store, key)
        by_folder.setdefault(os.path.dirname(target), {})[os.path.basename(target)] = key
    present, stale = set(), []
    for folder, names in by_folder.items():
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry in names:
                present.add(names[entry])
                continue
            match = TEMPORARY.match(entry)
            if match and match.group("name") in names:
                stale.append(os.path.join(folder, entry))
    return present, stale


def _annotator_settings(annotator, image_size, mean, std, interpolation, topk, store, log):
    """(weights path or None, the settings label_maps.json records): the annotator's record with the
    SHA-256 of its weights file in place of its path, and every setting that changes the maps."""
    record = dict(getattr(annotator, "record", None) or {"name": getattr(annotator, "name", type(annotator).__name__)})
    weights = record.pop("weights", None)
    if weights:
        started = time.time()
        record["weights_sha256"] = sha256_file(weights)
        log(f"annotator weights {weights}: sha256 {record['weights_sha256'][:16]}... "
            f"({format_bytes(os.path.getsize(weights))} read in {time.time() - started:.1f} s)")
    return weights, {"annotator": record, "image_size": list(image_size), "mean": list(mean), "std": list(std),
                     "interpolation": interpolation, "topk": topk, "store": store}


def _pack(out_dir, items, progress):
    from passl.data.label_maps import NpyLabelStore, pack_label_maps
    parts = NpyLabelStore(os.path.join(out_dir, "parts"), coverage="full")
    keys = [k for k, _ in items if k in parts]
    pack_label_maps(parts, out_dir, keys=keys, progress=progress)


def _flat(settings, prefix=""):
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_previous_run(out_dir, now, existing, log=print):
    """The info of the run that wrote ``out_dir`` before ({} if none); refuse to add maps made by another
    annotator or with other settings than ``now``. ``existing``: maps of this rank already in ``out_dir``."""
    path = os.path.join(out_dir, INFO_FILE)
    if not os.path.isfile(path):
        if existing:
            raise DataError(f"{out_dir} holds {existing} label map(s) but no {INFO_FILE}, so which annotator made them "
                            "is unknown and new maps could mix with them; use another --out")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert isinstance(info, dict)
    except (OSError, ValueError, AssertionError):
        raise DataError(f"{path} is not a label_maps.json written by tools/generate_labels.py; use another --out") \
            from None
    if "annotator" not in info:
        log(f"warning: {path} does not record which annotator made the maps already in {out_dir}; "
            "they are assumed to come from this one")
    before, after = _flat({k: v for k, v in info.items() if k in now}), _flat(now)
    differ = [k for k in sorted(set(before) | set(after))
              if k.split(".")[0] in info and before.get(k) != after.get(k)]
    if differ:
        made_by = f" (weights {info['weights']})" if info.get("weights") else ""
        raise DataError(f"{path}: the maps already in {out_dir} were made by another annotator or with other "
                        "settings (" + ", ".join(f"{k} {before.get(k)} != {after.get(k)}" for k in differ)
                        + f"){made_by}; use another --out, or the same annotator and settings to complete that run")
    return info


def _write_info(out_dir, image_root, settings, map_shape, weights=None):
    """out_dir/label_maps.json: what made the maps (annotator, weights, settings) and what they are
    (coverage full, shape, dtype); the pipeline needs coverage: full."""
    info = {"coverage": "full", "image_root": os.path.abspath(image_root), **settings,
            "weights": weights and os.path.abspath(weights), "map_shape": map_shape, "dtype": "float16"}
    write_text(os.path.join(out_dir, INFO_FILE), json.dumps(info, indent=1))
