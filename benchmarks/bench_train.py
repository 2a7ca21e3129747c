"""Training-step throughput and peak memory of any model config on the current device.

One step = forward (training mode, MixToken on) + the configured loss on compact token targets
+ backward + optimizer step (+ clear_grad), on synthetic images and targets pooled from random
top-K label maps, so the loss does the same work as in a real run. Warm-up steps are excluded;
the median of the timed steps is reported. Prints one JSON object.

    python benchmarks/bench_train.py --model lvvit_t --batch-size 16
    python benchmarks/bench_train.py -c configs/lvvit/lvvit_small.yaml --batch-size 128 --device gpu
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common.add_model_args(p)   # -c CONFIG: its model, loss, optimizer and amp sections
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--map-size", type=int, default=15, help="label-map cells per side (published maps: 15)")
    p.add_argument("--top-k", type=int, default=5, help="classes per label-map cell")
    p.add_argument("--classes-per-image", type=int, default=20,
                   help="each map's cells draw their top-K from this many classes (real maps are spatially "
                        "coherent: a crop touches ~10-40 classes)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="mixed precision: auto = the config's amp section (on for GPU), on, off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-fast-paths", choices=["on", "off"], default="on",
                   help="on the CPU: the fast paths a CPU training run uses (passl/utils/cpu_fast.py), or the "
                        "plain code a GPU runs")
    p.add_argument("--profile", action="store_true", help="print Paddle's operator profile to stderr")
    return _common.add_common_args(p)


def resolve_config(args):
    """The model / loss / optimizer / amp sections from the config file and the flags."""
    if args.config:
        from passl.config import load_config
        cfg = load_config(args.config, args.override)
    else:
        cfg = {"model": {"name": "lvvit_t"}, "loss": {"name": "TokenLabelCrossEntropy"},
               "optimizer": {"name": "AdamW", "lr": 1.6e-3, "reference_batch": 1024, "weight_decay": 0.05},
               "amp": {"enable": "auto", "level": "O1", "dtype": "float16"}}
    return cfg, _common.resolve_model_cfg(args, cfg)


def synthetic_batch(batch_size, img_size, num_classes, grid, map_size, top_k, seed, classes_per_image=20):
    """Numpy batch as collate_fn makes it: image [B, 3, H, W] and compact targets pooled from random
    top-K maps over random crops (the loss sees realistic U, the number of present classes)."""
    from passl.data import collate_fn
    from passl.data.targets import build_token_targets
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(batch_size):
        scores = np.sort(rng.gamma(2.0, 2.0, (top_k, map_size, map_size)), axis=0)[::-1]
        pool = rng.choice(num_classes, max(top_k, min(classes_per_image, num_classes)), replace=False)
        classes = np.stack([rng.choice(pool, top_k, replace=False) for _ in range(map_size * map_size)])
        label_map = np.stack([scores, classes.T.reshape(top_k, map_size, map_size)]).astype(np.float32)
        side = rng.uniform(0.3, 1.0) * map_size
        x0, y0 = rng.uniform(0, map_size - side, 2)
        item = {"image": rng.standard_normal((3, img_size, img_size), dtype=np.float32),
                "label": np.asarray(int(classes[0, 0]), np.int64)}
        item.update(build_token_targets(label_map, (x0, y0, x0 + side, y0 + side), (0, 0, map_size, map_size),
                                        grid, num_classes))
        samples.append(item)
    return collate_fn(samples)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg, model_cfg = resolve_config(args)
    import paddle
    import passl
    from passl.engine.amp import resolve_amp
    from passl.engine.optim import build_optimizer

    from passl.utils import cpu_fast
    device = _common.select_device(args.device)
    if args.cpu_fast_paths == "off":
        cpu_fast.disable_cpu_fast_paths()
    paddle.seed(args.seed)
    model = passl.build_model(model_cfg)
    model.train()
    loss_fn = passl.build_loss(cfg.get("loss") or {"name": "TokenLabelCrossEntropy"})
    amp_cfg = dict(cfg.get("amp") or {})
    if args.amp != "auto":
        amp_cfg["enable"] = args.amp == "on"
    amp = resolve_amp(amp_cfg, "gpu" if device.startswith("gpu") else "cpu", log=None)
    optimizer, _ = build_optimizer(cfg["optimizer"], model, args.batch_size, log=None,
                                   multi_precision=amp.enabled)
    model, optimizer = amp.decorate(model, optimizer)

    img_size = model.img_size[0]
    host = synthetic_batch(args.batch_size, img_size, model.num_classes, model.grid_size, args.map_size,
                           args.top_k, args.seed, args.classes_per_image)
    batch = {k: paddle.to_tensor(v) for k, v in host.items()}
    last = {}

    def step():
        with amp.autocast():
            outputs = model(batch["image"])
            losses = loss_fn(outputs, batch)
        loss = losses["loss"]
        if amp.scaler is not None:
            amp.scaler.scale(loss).backward()
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.clear_grad()
        last["loss"] = loss

    from tqdm import tqdm
    _common.reset_device_peak(device)
    bar = tqdm(total=args.repeats, desc=f"train {model_cfg['name']} b{args.batch_size}", file=sys.stderr,
               leave=False, disable=not sys.stderr.isatty())
    cpu_times = []
    times = _common.time_repeats(step, args.warmup, args.repeats, device, bar, cpu_times)
    bar.close()
    if args.profile:
        profile_steps(step, device)
    loss_value = float(last["loss"])
    timing = _common.summarize(times, cpu_times)
    result = {
        "benchmark": "train", "model": model_cfg["name"], "img_size": img_size, "batch_size": args.batch_size,
        "num_classes": model.num_classes,
        "params": int(sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)),
        "amp": amp.describe(), "images_per_s": args.batch_size / timing["median_s"],
        "step_ms": 1000 * timing["median_s"], "timing": timing, "warmup": args.warmup,
        "target_width": int(host["target_classes"].shape[1]), "loss": loss_value,
        "peak_rss_mb": _common.peak_rss_mb(), "gpu_max_allocated_mb": _common.device_peak_mb(device),
        "cpu_fast_paths": cpu_fast.enabled_fast_paths(),
        "env": _common.environment(device),
    }
    print(f"{model_cfg['name']} batch {args.batch_size}: {result['images_per_s']:.1f} images/s "
          f"({result['step_ms']:.0f} ms/step, median of {args.repeats})", file=sys.stderr)
    _common.emit(result, args.json_out)
    return 0


def profile_steps(step, device, steps=3):
    """Paddle's operator summary of a few steps, to stderr (for finding hot spots)."""
    import paddle.profiler as profiler
    targets = [profiler.ProfilerTarget.CPU] + ([profiler.ProfilerTarget.GPU] if device.startswith("gpu") else [])
    prof = profiler.Profiler(targets=targets, on_trace_ready=lambda p: None)   # table only, no trace files
    prof.start()
    for _ in range(steps):
        step()
        prof.step()
    prof.stop()
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        prof.summary(op_detail=True, thread_sep=False, time_unit="ms")
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(main)   # a config or data error prints one line and exits 2
