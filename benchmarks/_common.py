"""Shared helpers of the benchmark scripts: repo import, device choice, timing, memory, JSON output.

Benchmarks print numbers (one JSON object on stdout), never assertions. Each script imports this
module (it puts the repository first on sys.path), then calls
``passl.utils.runtime.configure_process()`` before anything imports paddle, as tools/*.py do.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from passl.utils.cpu_threads import cpu_model  # noqa: E402

__all__ = ["REPO", "select_device", "time_repeats", "summarize", "peak_rss_mb", "device_peak_mb",
           "reset_device_peak", "environment", "emit", "load_average", "add_common_args", "add_model_args", "resolve_model_cfg"]


def add_common_args(parser):
    """--device, --warmup, --repeats, --json-out (shared by every benchmark)."""
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, gpu, gpu:1")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations (the median is reported)")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return parser


def add_model_args(parser):
    """-c/-o (a config's model section), --model, --img-size, --num-classes, --model-arg KEY=VALUE."""
    parser.add_argument("-c", "--config", default=None, help="YAML config (its model section, and more per script)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. -o model.drop_path_rate=0")
    parser.add_argument("--model", default=None, help="model name (replaces the config's model), e.g. lvvit_t")
    parser.add_argument("--img-size", type=int, default=None, help="default: the config's, else the model's")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the config's, else 1000")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model keyword (YAML value), e.g. --model-arg embed_dim=32 (with --model LVViT)")
    return parser


def resolve_model_cfg(args, cfg=None):
    """The ``model:`` dict from the config (if any) and the model flags; default lvvit_t."""
    from passl.config import parse_value
    model_cfg = dict((cfg or {}).get("model") or {"name": "lvvit_t"})
    if args.model:
        model_cfg = {k: v for k, v in model_cfg.items() if k in ("img_size", "num_classes")}
        model_cfg["name"] = args.model
    if args.img_size:
        model_cfg["img_size"] = args.img_size
    if args.num_classes:
        model_cfg["num_classes"] = args.num_classes
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg {item!r}: use KEY=VALUE")
        model_cfg[key.strip()] = parse_value(value)
    return model_cfg


def select_device(name="auto"):
    """Set paddle's device as tools/train.py does (passl.utils.distributed.select_device, whose CPU
    settings include the CPU fast paths): 'auto' = the first GPU when one is usable, else cpu;
    'gpu:1' picks a GPU. Returns 'cpu' or 'gpu:N'."""
    import paddle

    from passl.utils.distributed import select_device as select_run_device
    kind, _, index = name.partition(":")
    if select_run_device(kind, log=None) == "cpu":
        return "cpu"
    if index:
        paddle.set_device(name)
    return paddle.device.get_device()


def synchronize(device):
    """Wait for queued device work so that wall-clock timings are honest (no-op on the CPU)."""
    import paddle
    if device.startswith("gpu"):
        paddle.device.cuda.synchronize()


def time_repeats(fn, warmup, repeats, device="cpu", progress=None, cpu_times=None):
    """Call ``fn()`` warmup + repeats times; returns the wall seconds of each timed call (list of float).
    ``cpu_times``: a list that receives the process CPU seconds of each timed call (all threads; on a
    shared machine it moves less than wall time, but counts threads that spin while waiting)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu)
        if progress is not None:
            progress.update(1)
    return times


def summarize(times, cpu_times=None):
    """{'median_s', 'min_s', 'max_s', 'repeats'} of a list of seconds (+ 'cpu_median_s')."""
    out = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}
    if cpu_times:
        out["cpu_median_s"] = statistics.median(cpu_times)
    return out


def load_average():
    """1-minute load average (other work on the machine skews timings), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def peak_rss_mb():
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2 ** 20


def reset_device_peak(device):
    import paddle
    if device.startswith("gpu"):
        paddle.device.cuda.reset_max_memory_allocated()


def device_peak_mb(device):
    """Max memory allocated by paddle on the GPU (MiB), None on the CPU."""
    import paddle
    if device.startswith("gpu"):
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20
    return None


def environment(device):
    """Where the numbers come from: versions, device, threads."""
    import paddle
    return {"paddle": paddle.__version__, "python": platform.python_version(), "device": device,
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
            "machine": platform.machine(), "cpu_model": cpu_model(), "load_average": load_average()}


def emit(result, json_out=None):
    """Print ``result`` as one JSON line on stdout (and write it to ``json_out``)."""
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
