"""Training-pipeline throughput of ONE worker (samples/s) on generated ImageNet-like data.

Writes JPEGs of ImageNet-like sizes (~500x375, both orientations, quality 90, ~100 KB) and label
maps ([2, K, H, W] float16 .npy, spatially coherent top-K like the published maps) to a temporary
folder, builds the configured training dataset on them (the config's transforms; default the
lvvit_tiny recipe: flip, RandAugment m9, RandomResizedCrop 224, Normalize, RandomErasing), and
times ``dataset[i]`` + ``collate_fn`` in this process, with a per-stage breakdown:

    decode (plan + JPEG decode, draft-reduced where the crop allows), label_map_load, one entry
    per per-sample transform (RandAugment's image work; its label-map warps are ``label_map_warp``;
    RandomErasing only draws its boxes), to_uint8 (PIL -> uint8 [3, H, W]), targets (pooling +
    compact softmax), collate (per sample)

and the bytes per sample handed to the trainer. Normalize and RandomErasing's pixel work run on the
collated batch in the training process, on its device (``finish_batch``); that is timed apart on
this machine's CPU (``finish_ms_per_batch``) and is not part of a worker's throughput.
Prints one JSON object.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py -c configs/lvvit/lvvit_small.yaml --num-images 64 --passes 3
    python benchmarks/bench_data.py --split val      # the evaluation pipeline: resize, centre crop
"""
import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402

# ImageNet's most common sizes (w, h)
IMAGE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (640, 480))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=os.path.join(_common.REPO, "configs/lvvit/lvvit_tiny.yaml"),
                   help="config whose data.train transforms and model geometry are used")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--img-size", type=int, default=None,
                   help="output size: sets model.img_size, which every sized transform then takes")
    p.add_argument("--num-images", type=int, default=48, help="generated images (cycled through)")
    p.add_argument("--passes", type=int, default=3, help="timed passes over the images (median pass reported)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per collate_fn call")
    p.add_argument("--map-size", type=int, default=15, help="label-map cells per side")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--no-label-maps", action="store_true", help="one-hot targets only (no label store)")
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="val: the evaluation pipeline (data.val transforms, no label maps, no targets)")
    p.add_argument("--data-dir", default=None, help="keep the generated data here (default: a temp dir, removed)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_image(rng, width, height):
    """uint8 [h, w, 3]: smooth colour field + shapes + sensor-like noise (JPEG size like a photo)."""
    from PIL import Image, ImageDraw
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(10, width / 2), y0 + rng.uniform(10, height / 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(img, np.float32) + rng.normal(0, 14, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_label_map(rng, num_classes, map_size, top_k):
    """float16 [2, K, s, s]: per cell, top-K classes from a small per-image pool, scores descending."""
    pool = rng.choice(num_classes, min(num_classes, max(top_k, 8)), replace=False)
    cells = map_size * map_size
    classes = np.stack([rng.choice(pool, top_k, replace=False) for _ in range(cells)], axis=1)
    scores = -np.sort(-rng.gamma(2.0, 2.0, (top_k, cells)), axis=0)
    return np.stack([scores, classes]).reshape(2, top_k, map_size, map_size).astype(np.float16)


def generate(root, num_images, num_classes, map_size, top_k, seed):
    """ImageFolder layout root/images/<cls>/<i>.JPEG and maps root/labels/<cls>/<i>.npy; returns bytes of JPEGs."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(num_images):
        cls = f"c{i % 4:03d}"
        for sub in ("images", "labels"):
            os.makedirs(os.path.join(root, sub, cls), exist_ok=True)
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        path = os.path.join(root, "images", cls, f"{i:05d}.JPEG")
        Image.fromarray(make_image(rng, width, height)).save(path, quality=90)
        total += os.path.getsize(path)
        np.save(os.path.join(root, "labels", cls, f"{i:05d}.npy"), make_label_map(rng, num_classes, map_size, top_k))
    return total


class StageClock:
    """Accumulates wall seconds and CPU seconds of this thread per stage name (on a busy machine
    the CPU time is the steadier measure of the work a stage does)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.cpu_seconds = collections.defaultdict(float)

    def clear(self):
        self.seconds.clear()
        self.cpu_seconds.clear()

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.cpu_seconds[name] += time.thread_time() - cpu
        return timed


def instrument(dataset, clock):
    """Time the dataset's stages in place (measurement only: the same code runs)."""
    import passl.data.datasets as datasets_module
    import passl.data.randaugment as randaugment_module
    import passl.data.transforms as transforms_module
    dataset.decode = clock.wrap("decode", dataset.decode)
    dataset.load_label_map = clock.wrap("label_map_load", dataset.load_label_map)
    datasets_module.build_token_targets = clock.wrap("targets", datasets_module.build_token_targets)
    datasets_module.to_uint8_chw = clock.wrap("to_uint8", datasets_module.to_uint8_chw)
    # label-map work inside transforms is counted apart and subtracted from the transform's time
    warp = clock.wrap("label_map_warp", transforms_module.warp_label_map)
    randaugment_module.warp_label_map = warp
    names = collections.Counter()
    for index, transform in enumerate(dataset.transforms):
        name = type(transform).__name__
        names[name] += 1
        label = name if names[name] == 1 else f"{name}{names[name]}"
        dataset.transforms[index] = _TimedTransform(transform, clock, label)


class _TimedTransform:
    def __init__(self, inner, clock, label):
        self.inner, self.clock, self.label = inner, clock, label

    def plan(self, sample, rng):
        return self.inner.plan(sample, rng)

    def __call__(self, sample, rng):
        clock = self.clock
        warp_before, warp_cpu_before = clock.seconds["label_map_warp"], clock.cpu_seconds["label_map_warp"]
        start, cpu = time.perf_counter(), time.thread_time()
        out = self.inner(sample, rng)
        clock.seconds[self.label] += time.perf_counter() - start - (clock.seconds["label_map_warp"] - warp_before)
        clock.cpu_seconds[self.label] += time.thread_time() - cpu - (clock.cpu_seconds["label_map_warp"]
                                                                      - warp_cpu_before)
        return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    import passl
    from passl.config import load_config
    from passl.data import build_dataset, collate_fn

    base = load_config(args.config, args.override)
    if args.img_size:   # every transform's size follows the model's
        base["model"] = dict(base["model"], img_size=args.img_size)
        base["data"]["train"]["transforms"] = [{k: v for k, v in t.items() if k != "size"}
                                               for t in base["data"]["train"]["transforms"]]
    model = passl.build_model(base["model"])   # its geometry, as the trainer reads it
    num_classes, grid, img_size = model.num_classes, tuple(model.grid_size), model.img_size
    del model
    root = args.data_dir or tempfile.mkdtemp(prefix="passl_bench_data_")
    try:
        jpeg_bytes = generate(root, args.num_images, num_classes, args.map_size, args.top_k, args.seed)
        split = dict(base["data"][args.split])
        split["dataset"] = dict(split["dataset"] or {"name": "ImageFolder"}, root=os.path.join(root, "images"))
        split["label_store"] = None if args.no_label_maps or args.split == "val" else {
            "name": "npy", "root": os.path.join(root, "labels"), "coverage": "center_square"}
        dataset = build_dataset(split, args.split, num_classes, grid, img_size)
        clock = StageClock()
        instrument(dataset, clock)
        result = run_passes(dataset, collate_fn, args, clock)
        result.update(time_finish(dataset, collate_fn, args))
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    result.update({
        "benchmark": "data", "config": os.path.relpath(args.config, _common.REPO), "num_images": args.num_images,
        "split": args.split, "mean_jpeg_kb": jpeg_bytes / args.num_images / 1024,
        "label_maps": not args.no_label_maps and args.split == "train",
        "map_shape": [2, args.top_k, args.map_size, args.map_size], "grid": list(grid), "num_classes": num_classes,
        "transforms": [t.label for t in dataset.transforms], "env": _common.environment("cpu"),
    })
    print(f"pipeline: {result['samples_per_s']:.1f} samples/s per worker "
          f"({result['samples_per_cpu_s']:.1f} per CPU-second), "
          f"{result['bytes_per_sample'] / 1024:.0f} KiB per sample", file=sys.stderr)
    _common.emit(result, args.json_out)
    return 0


def run_passes(dataset, collate_fn, args, clock):
    """One untimed pass, then ``passes`` timed ones; stage times are per sample over the timed passes."""
    from tqdm import tqdm
    import statistics
    count = len(dataset)

    def one_pass(epoch):
        np.random.seed(args.seed + epoch)
        batch, samples, sizes = [], 0, []
        for i in range(count):
            batch.append(dataset[i])
            if len(batch) == args.batch_size or i == count - 1:
                out = clock.wrap("collate", collate_fn)(batch)
                sizes.append((sum(v.nbytes for v in out.values()), len(batch),
                              {k: v.nbytes for k, v in out.items()}))
                samples += len(batch)
                batch = []
        return samples, sizes

    one_pass(0)                  # warm-up: file cache, imports, lookup tables
    clock.clear()
    pass_times, pass_cpu, sizes = [], [], []
    bar = tqdm(range(args.passes), desc="data passes", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
    for epoch in bar:
        start, cpu = time.perf_counter(), time.process_time()
        samples, sizes = one_pass(epoch + 1)
        pass_times.append(time.perf_counter() - start)
        pass_cpu.append(time.process_time() - cpu)
    total_samples = args.passes * count
    median = statistics.median(pass_times)
    total_bytes = sum(s[0] for s in sizes)
    per_key = collections.Counter()
    for _, _, keys in sizes:
        per_key.update(keys)
    n_last = sum(s[1] for s in sizes)
    stages = {name: 1000 * sec / total_samples for name, sec in sorted(clock.seconds.items())}
    cpu_stages = {name: 1000 * sec / total_samples for name, sec in sorted(clock.cpu_seconds.items())}
    median_cpu = statistics.median(pass_cpu)
    return {
        "samples_per_s": count / median, "ms_per_sample": 1000 * median / count,
        "samples_per_cpu_s": count / median_cpu, "cpu_ms_per_sample": 1000 * median_cpu / count,
        "pass_seconds": pass_times, "pass_cpu_seconds": pass_cpu,
        "stage_ms_per_sample": stages, "stage_sum_ms": sum(stages.values()),
        "stage_cpu_ms_per_sample": cpu_stages, "stage_cpu_sum_ms": sum(cpu_stages.values()),
        "bytes_per_sample": total_bytes / n_last,
        "bytes_per_sample_by_key": {k: v / n_last for k, v in sorted(per_key.items())},
    }


def time_finish(dataset, collate_fn, args, repeats=5):
    """Median time of ``finish_batch`` (normalise + erase) on one collated batch, on the CPU."""
    import statistics
    import paddle
    _common.select_device("cpu")
    np.random.seed(args.seed)
    host = collate_fn([dataset[i % len(dataset)] for i in range(args.batch_size)])
    times = []
    for _ in range(repeats + 1):
        batch = {k: paddle.to_tensor(v) for k, v in host.items()}
        start = time.perf_counter()
        dataset.finish_batch(batch, noise_seed=args.seed + 1)["image"].numpy()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    return {"finish_ms_per_batch": 1000 * median, "finish_ms_per_sample": 1000 * median / args.batch_size}


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(main)   # a config or data error prints one line and exits 2
