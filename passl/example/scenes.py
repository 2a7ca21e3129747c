"""The offline example dataset: scenes of real handwritten digits, written as an ImageNet-layout folder.

Source: scikit-learn's bundled copy of the UCI "optical recognition of handwritten digits" set
(``sklearn.datasets.load_digits``: 1797 grayscale 8x8 images, read from a file inside the package,
no download). Each scene is a non-square RGB image on a textured, coloured background holding one
large *main* digit, which is the image's class, and 1-3 smaller *distractor* digits of other classes.
Because the distractors cover tokens of other classes, a dense (per-token) label carries information
that the image label does not, which is what Token Labeling is about.

Layout written by :func:`build_digit_scenes`::

    out_dir/
      classes.txt                     one name per line, in class order ("zero" ... "nine")
      meta.json                       parameters, counts, and every digit drawn (class, box, source)
      train/<class_dir>/<class_dir>_<i>.jpg     class_dir = "0_zero" ... "9_nine" (sorted = class index)
      val/<class_dir>/<class_dir>_<i>.jpg

Train and val scenes draw their digits from disjoint halves of the 1797 sources. Everything is a
function of the seed: image i of class c in a split has its own numpy Generator seeded with
(seed, split, c, i), so adding images never changes the ones already there.
"""
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

from passl.errors import DataError

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_DIRS = tuple(f"{i}_{name}" for i, name in enumerate(CLASS_NAMES))
SPLITS = ("train", "val")
SOURCE = ("sklearn.datasets.load_digits: UCI optical recognition of handwritten digits, "
          "1797 grayscale 8x8 images bundled with scikit-learn")
# Bump when the drawing changes, so that an old folder is not mistaken for the same dataset.
GENERATOR_VERSION = 2
# 3000 training scenes: at equal compute a small CNN reached 57% val top-1 on 3000 distinct scenes and
# 18% on 1000 (it memorises those); building them takes seconds. 500 val scenes: +-2% resolution.
DEFAULT_TRAIN_PER_CLASS = 300
DEFAULT_VAL_PER_CLASS = 50
DEFAULT_IMAGE_SIZE = (80, 64)  # (width, height): non-square, and 64 high so 64-px crops keep most of it
VAL_SOURCE_FRACTION = 0.25     # of each class's source digits, kept for val only
MAIN_SIZE_FRAC = (0.45, 0.62)  # main digit height as a fraction of the scene height (29-40 px at 64)
DISTRACTOR_SIZE_FRAC = (0.19, 0.31)  # (12-20 px at 64)
MAX_OVERLAP = 0.25             # a distractor may hide under another digit by at most this share of its box
JPEG_QUALITY = 92
# How hard the scenes are: background texture and digit contrast, tuned so that a small CNN learns
# the task in a few CPU minutes. Backgrounds stay dark so light digits of any hue stand out.
BACKGROUND_MAX = 110.0         # per channel, before texture
DESATURATE = 0.4               # pull the background colour this far towards grey
BLOB_STD = 25.0
STRIPE_AMPLITUDE = 8.0
NOISE_STD = (2.0, 8.0)
MIN_CONTRAST = 100.0


def load_source_digits():
    """The 1797 sklearn digits. Returns (images [1797, 8, 8] float32 in [0, 1], labels [1797] int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the digit example needs scikit-learn: pip install -e .[example] "
                        "(or pip install scikit-learn)") from e
    digits = load_digits()  # reads sklearn/datasets/data/digits.csv.gz; never touches the network
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_sources(labels, seed, val_fraction=VAL_SOURCE_FRACTION):
    """Split source indices per class into disjoint train/val pools.

    labels: [N] class per source digit. Returns {"train": [pool_c for c in 0..9], "val": [...]},
    each pool_c a shuffled int64 array of source indices of class c.
    """
    rng = np.random.default_rng([seed, 7919])  # a stream of its own, separate from the images'
    pools = {split: [] for split in SPLITS}
    for c in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(members) * val_fraction)))
        pools["val"].append(members[:n_val])
        pools["train"].append(members[n_val:])
    return pools


def _background(rng, width, height):
    """A dark, coloured, textured background: [H, W, 3] float32 in [0, 255]."""
    base = rng.uniform(0, BACKGROUND_MAX, size=3)
    base = base * (1 - DESATURATE) + base.mean() * DESATURATE
    # Low-frequency colour blobs: a coarse random grid, smoothly upscaled.
    grid = rng.normal(0, BLOB_STD, size=(rng.integers(2, 6), rng.integers(2, 6), 3)) + base
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(grid, "RGB").resize((width, height), Image.BICUBIC), np.float32)
    # Stripes of random frequency and angle, then per-pixel noise: texture the model must learn to ignore.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    texture = (stripes[..., None] * rng.uniform(0, STRIPE_AMPLITUDE, size=3)
               + rng.normal(0, rng.uniform(*NOISE_STD), (height, width, 3)))
    return np.clip(blobs + texture, 0, 255).astype(np.float32)


def _luminance(rgb):
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _digit_colour(rng, background_patch):
    """A random colour at least MIN_CONTRAST brighter (luminance) than the background under the digit.

    Always lighter than the background: with both polarities a small model needs many times more
    data to learn the shapes (measured), and the example must train in minutes.
    """
    under = _luminance(background_patch.reshape(-1, 3).mean(0))
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if _luminance(colour) - under >= MIN_CONTRAST:
            return colour
    return np.full(3, 255.0)


def _digit_alpha(digit, width, height):
    """Upscale one 8x8 digit [8, 8] in [0, 1] smoothly to an opacity mask [height, width] in [0, 1]."""
    small = Image.fromarray(np.round(digit * 255).astype(np.uint8), "L")
    alpha = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32) / 255.0
    # Bicubic upscaling of 8 px leaves soft ramps; a contrast stretch makes solid strokes again.
    return np.clip((alpha - 0.15) / 0.55, 0.0, 1.0)


def _overlap(box, other):
    """Share of box's area that lies inside other; boxes are [x0, y0, x1, y1], x1/y1 exclusive."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / float((box[2] - box[0]) * (box[3] - box[1]))


def _random_box(rng, size_frac, width, height):
    """A box [x0, y0, x1, y1] wholly inside the scene, height from size_frac, slightly narrower than tall."""
    box_h = int(round(rng.uniform(*size_frac) * height))
    box_w = max(4, int(round(box_h * rng.uniform(0.8, 1.0))))
    x0 = int(rng.integers(0, width - box_w + 1))
    y0 = int(rng.integers(0, height - box_h + 1))
    return [x0, y0, x0 + box_w, y0 + box_h]


def render_scene(rng, images, main_source, main_class, source_pools, width, height):
    """Draw one scene.

    rng: numpy Generator (the scene's own). images: [N, 8, 8] source digits in [0, 1]. main_source: index
    of the main digit in images. source_pools: per class an array of source indices to draw distractors
    from (the split's own pools).
    Returns (scene [height, width, 3] uint8, digits) where digits is a list of dicts
    {"class", "box": [x0, y0, x1, y1] in pixels (x1, y1 exclusive), "source", "main"}, main digit first.
    """
    scene = _background(rng, width, height)
    main_box = _random_box(rng, MAIN_SIZE_FRAC, width, height)
    others = [c for c in range(len(CLASS_NAMES)) if c != main_class]
    n_distractors = int(rng.integers(1, 4))
    distractor_classes = rng.choice(others, size=n_distractors, replace=False)
    placed = []
    for cls in distractor_classes:
        for _ in range(50):
            box = _random_box(rng, DISTRACTOR_SIZE_FRAC, width, height)
            if all(_overlap(box, b) <= MAX_OVERLAP for b in [main_box] + [d["box"] for d in placed]):
                pool = source_pools[int(cls)]
                placed.append({"class": int(cls), "box": box, "source": int(pool[rng.integers(len(pool))]),
                               "main": False})
                break
    main = {"class": int(main_class), "box": main_box, "source": int(main_source), "main": True}
    # Distractors first, the main digit last: it is never hidden, only possibly overlapping a little.
    for digit in placed + [main]:
        x0, y0, x1, y1 = digit["box"]
        alpha = _digit_alpha(images[digit["source"]], x1 - x0, y1 - y0)[..., None]
        colour = _digit_colour(rng, scene[y0:y1, x0:x1])
        scene[y0:y1, x0:x1] = scene[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    return np.clip(np.round(scene), 0, 255).astype(np.uint8), [main] + placed


def _params(train_per_class, val_per_class, image_size, seed):
    return {"train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
            "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed),
            "generator_version": GENERATOR_VERSION}


def read_meta(out_dir):
    """meta.json of a built dataset as a dict, or None if the folder has none (or it is unreadable)."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(out_dir, meta):
    """True if every image listed in meta.json is on disk (a folder someone emptied is not the dataset)."""
    return all(os.path.isfile(os.path.join(out_dir, item["file"])) for item in meta.get("images", []))


def _remove_stale_builds(parent, name):
    """Delete .<name>.tmp-<pid> / .old-<pid> folders left by builds that were killed (their pid is gone)."""
    for entry in os.listdir(parent):
        prefix, _, pid = entry.rpartition("-")
        if prefix not in (f".{name}.tmp", f".{name}.old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # another build of the same folder is running; leave its files alone
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _write(tmp_dir, params, progress):
    from tqdm import tqdm

    images, labels = load_source_digits()
    pools = split_sources(labels, params["seed"])
    width, height = params["image_size"]
    jobs = [(split, c, i) for split in SPLITS for c in range(len(CLASS_NAMES))
            for i in range(params[f"{split}_per_class"])]
    records = []
    for split in SPLITS:
        for class_dir in CLASS_DIRS:
            os.makedirs(os.path.join(tmp_dir, split, class_dir))
    for split, c, i in tqdm(jobs, desc="digit scenes", unit="img", disable=not progress):
        rng = np.random.default_rng([params["seed"], SPLITS.index(split), c, i])
        pool = pools[split][c]
        main_source = int(pool[i % len(pool)])  # cycle through the class's sources before reusing one
        scene, digits = render_scene(rng, images, main_source, c, pools[split], width, height)
        rel = f"{split}/{CLASS_DIRS[c]}/{CLASS_DIRS[c]}_{i:04d}.jpg"
        Image.fromarray(scene, "RGB").save(os.path.join(tmp_dir, rel), quality=JPEG_QUALITY)
        records.append({"file": rel, "split": split, "label": c, "digits": digits})
    with open(os.path.join(tmp_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    meta = {
        "format": "digit_scenes", "source": SOURCE, "params": params,
        "image_size": {"width": width, "height": height},
        "classes": list(CLASS_NAMES), "class_dirs": list(CLASS_DIRS),
        "counts": {split: sum(r["split"] == split for r in records) for split in SPLITS},
        "source_digits": {split: int(sum(len(p) for p in pools[split])) for split in SPLITS},
        "box_format": "[x0, y0, x1, y1] pixels, x1/y1 exclusive; digits[0] is the main digit (the label)",
        "images": records,
    }
    # meta.json last: its presence marks a finished build.
    with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
        f.write(_meta_json(meta))
    return meta


def _meta_json(meta):
    """meta as JSON with one line per top-level key and one line per image (readable, and diffs well)."""
    fields = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in meta.items() if key != "images"]
    images = ",\n".join(f"  {json.dumps(record)}" for record in meta["images"])
    return "{\n" + ",\n".join(fields) + ',\n "images": [\n' + images + "\n ]\n}\n"


def _existing_is_same(out_dir, params, force):
    """True if out_dir already holds the dataset params describe (and not force); False if there is
    nothing there or force allows replacing what is; otherwise DataError saying what is there."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir} exists and is not a folder; choose another --out")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return False
    meta = read_meta(out_dir)
    if meta is None or meta.get("format") != "digit_scenes" or not isinstance(meta.get("params"), dict):
        # --force must never wipe, say, data/ itself because of a mistyped --out.
        raise DataError(f"{out_dir} is not empty and is not a digit_scenes dataset (it has no meta.json of one); "
                        f"refusing to replace it even with --force: choose another --out or empty it yourself")
    if force:
        return False
    if meta["params"] == params and _is_complete(out_dir, meta):
        return True
    if meta["params"] == params:
        what = "this digit_scenes dataset with images missing"
    else:
        what = "a different digit_scenes dataset: " + ", ".join(
            f"{key} {meta['params'].get(key)} (asked for {value})" for key, value in params.items()
            if meta["params"].get(key) != value)
    raise DataError(f"{out_dir} already contains {what}; pass --force (force=True) to replace it, "
                    f"or choose another --out")


def build_digit_scenes(out_dir, train_per_class=DEFAULT_TRAIN_PER_CLASS, val_per_class=DEFAULT_VAL_PER_CLASS,
                       image_size=DEFAULT_IMAGE_SIZE, seed=0, force=False, log=print, progress=True):
    """Build the digit-scene example under out_dir (see the module docstring for the layout).

    image_size: (width, height) of every scene in pixels. The folder is built next to out_dir and renamed
    into place, so an interrupted build leaves nothing half-written at out_dir. If out_dir already holds
    this very dataset (same parameters, all images present), nothing is written. A different
    digit_scenes dataset there raises DataError unless force=True, which rebuilds it (force also
    rebuilds an identical one). A non-empty folder that is not a digit_scenes dataset is never replaced.
    Returns {"out_dir", "train", "val", "classes", "image_size": (W, H), "seed", "skipped", "seconds"}.
    """
    start = time.time()
    width, height = int(image_size[0]), int(image_size[1])
    if train_per_class < 1 or val_per_class < 1:
        raise DataError(f"train_per_class and val_per_class must be at least 1, "
                        f"got {train_per_class} and {val_per_class}")
    if min(width, height) < 24:
        raise DataError(f"image_size {width}x{height} is too small for legible digits; use at least 24x24")
    params = _params(train_per_class, val_per_class, (width, height), seed)
    out_dir = os.path.abspath(out_dir)
    summary = {"out_dir": out_dir, "train": params["train_per_class"] * len(CLASS_NAMES),
               "val": params["val_per_class"] * len(CLASS_NAMES), "classes": len(CLASS_NAMES),
               "image_size": (width, height), "seed": params["seed"], "skipped": False}

    if _existing_is_same(out_dir, params, force):
        summary.update(skipped=True, seconds=time.time() - start)
        log(f"digit_scenes: {out_dir} already holds this dataset ({summary['train']} train + "
            f"{summary['val']} val, {width}x{height} px, seed {seed}); nothing to do")
        return summary

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    old_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}")
    _remove_stale_builds(parent, os.path.basename(out_dir))
    try:
        _write(tmp_dir, params, progress)
        if os.path.isdir(out_dir):
            os.rename(out_dir, old_dir)  # set aside, not deleted, until the new folder is in place
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if os.path.isdir(old_dir):
                os.rename(old_dir, out_dir)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(old_dir, ignore_errors=True)
    summary["seconds"] = time.time() - start
    log(f"digit_scenes: wrote {summary['train']} train + {summary['val']} val images "
        f"({len(CLASS_NAMES)} classes, {width}x{height} px, seed {seed}) to {out_dir} "
        f"in {summary['seconds']:.1f} s")
    return summary
