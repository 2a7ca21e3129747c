"""Evaluation throughput (images/s): the eager model, and the exported one (to_static + jit.save) run
two ways: ``paddle.jit.load`` and a Paddle Inference predictor (passl.export.InferenceModel: oneDNN
and fused passes on the CPU; what tools/predict.py uses).

The model runs in eval mode (``cls + aux_weight * max over tokens of aux``) under no_grad on
random images; every path gets the same input, and the JSON reports the largest difference between
each one's outputs and the eager model's next to the timings (median of the timed batches, warm-up
excluded). Prints one JSON object.

    python benchmarks/bench_eval.py --model lvvit_t --batch-size 32
    python benchmarks/bench_eval.py -c configs/lvvit/lvvit_medium_384.yaml --batch-size 64 --device gpu
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402


MODES = ("eager", "jit_load", "predictor")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common.add_model_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    return _common.add_common_args(p)


def export(model, img_size, directory):
    """to_static with a dynamic batch, jit.save to ``directory``. Returns (path prefix, MiB on disk)."""
    import paddle
    spec = [paddle.static.InputSpec([None, 3, img_size[0], img_size[1]], "float32", name="images")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    prefix = os.path.join(directory, "model")
    paddle.jit.save(static, prefix)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return prefix, size / 2 ** 20


def exported_runner(mode, prefix, device):
    """A callable images -> logits (a paddle tensor) for ``jit_load`` or ``predictor``."""
    import paddle
    if mode == "jit_load":
        loaded = paddle.jit.load(prefix)
        loaded.eval()
        return loaded
    from passl.export import InferenceModel
    predictor = InferenceModel(prefix, device)
    return lambda images: paddle.to_tensor(predictor(images))


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = None
    if args.config:
        from passl.config import load_config
        cfg = load_config(args.config, args.override)
    model_cfg = _common.resolve_model_cfg(args, cfg)
    import paddle
    import passl
    from tqdm import tqdm

    device = _common.select_device(args.device)
    paddle.seed(args.seed)
    model = passl.build_model(model_cfg)
    model.eval()
    img_size = model.img_size
    images = paddle.to_tensor(np.random.default_rng(args.seed).standard_normal(
        (args.batch_size, 3, img_size[0], img_size[1]), dtype=np.float32))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(sorted(unknown))}; use {', '.join(MODES)}")
    results, outputs = {}, {}
    workdir = tempfile.mkdtemp(prefix="passl_bench_eval_")
    try:
        prefix = saved_mb = None
        for mode in modes:
            runner = model
            extra = {}
            if mode != "eager":
                if prefix is None:
                    prefix, saved_mb = export(model, img_size, workdir)
                runner, extra["saved_mb"] = exported_runner(mode, prefix, device), saved_mb
            _common.reset_device_peak(device)

            def forward():
                with paddle.no_grad():
                    outputs[mode] = runner(images)

            bar = tqdm(total=args.repeats, desc=f"eval {mode}", file=sys.stderr, leave=False,
                       disable=not sys.stderr.isatty())
            cpu_times = []
            times = _common.time_repeats(forward, args.warmup, args.repeats, device, bar, cpu_times)
            bar.close()
            timing = _common.summarize(times, cpu_times)
            results[mode] = {"images_per_s": args.batch_size / timing["median_s"],
                             "batch_ms": 1000 * timing["median_s"], "timing": timing,
                             "gpu_max_allocated_mb": _common.device_peak_mb(device), **extra}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"benchmark": "eval", "model": model_cfg["name"], "img_size": list(img_size),
              "batch_size": args.batch_size, "num_classes": model.num_classes, "modes": results,
              "peak_rss_mb": _common.peak_rss_mb(), "env": _common.environment(device)}
    if "eager" in outputs:
        result["max_abs_diff_vs_eager"] = {
            mode: float((outputs["eager"].astype("float32") - out.astype("float32")).abs().max())
            for mode, out in outputs.items() if mode != "eager"}
    summary = ", ".join(f"{m} {r['images_per_s']:.1f} images/s" for m, r in results.items())
    print(f"{model_cfg['name']} eval batch {args.batch_size}: {summary}", file=sys.stderr)
    _common.emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(main)   # a config or data error prints one line and exits 2
