"""The EMA update of passl/engine/ema.py (one flat float32 buffer: a concatenation and one lerp per step)
against the loop over the state dict it replaced (a cast, a lerp and a set_value per tensor). Prints one
JSON object (and a line per version on stderr).

The two versions alternate in one process (``--rounds`` rounds of ``--repeats`` timed updates each, the
order swapped every round), so that load from other work on the machine hits both alike; the median
process CPU time and wall time per update are reported, and the number of Paddle operations each
update launches (on a GPU each is a kernel launch, and the loop's two or three per tensor dominate).

    python benchmarks/bench_ema.py                     # lvvit_s on the CPU
    python benchmarks/bench_ema.py --model lvvit_t --rounds 6
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common.add_model_args(p)
    p.add_argument("--device", default="cpu", help="cpu, gpu, gpu:1")
    p.add_argument("--rounds", type=int, default=4, help="loop/flat alternations")
    p.add_argument("--repeats", type=int, default=10, help="timed updates per version and round")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p


def loop_update(targets, model, decay):
    """The per-tensor update passl/engine/ema.py had before the flat buffer."""
    import paddle
    source = model.state_dict()
    with paddle.no_grad():
        for key, ema_value in targets.items():
            value = source[key]
            if paddle.is_floating_point(ema_value):
                ema_value.set_value(paddle.lerp(ema_value, value.astype("float32"), 1.0 - decay))
            else:
                ema_value.set_value(value)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import copy

    import passl
    from passl.engine.ema import ModelEma
    args.model = args.model or (None if args.config else "lvvit_s")
    model_cfg = _common.resolve_model_cfg(args, _config(args))
    device = _common.select_device(args.device)
    model = passl.build_model(model_cfg)
    decay = 0.99992
    flat = ModelEma(model, decay)
    reference = copy.deepcopy(model)
    targets = reference.state_dict()
    tensors = len(targets)
    versions = {"loop": lambda: loop_update(targets, model, decay), "flat": lambda: flat.update(model)}
    ops = {}
    for name, fn in versions.items():
        fn()
        ops[name] = _dispatched(fn)
    samples = {name: [] for name in versions}
    order = list(versions)
    for index in range(args.rounds):
        for name in (order if index % 2 == 0 else order[::-1]):
            fn = versions[name]
            fn()
            _common.synchronize(device)
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                _common.synchronize(device)
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    rows = {name: {"cpu_ms": 1000 * statistics.median(c for _, c in s),
                   "wall_ms": 1000 * statistics.median(w for w, _ in s), "updates": len(s), "kernels": ops[name]}
            for name, s in samples.items()}
    rows["cpu_gain"] = rows["loop"]["cpu_ms"] / rows["flat"]["cpu_ms"]
    rows["wall_gain"] = rows["loop"]["wall_ms"] / rows["flat"]["wall_ms"]
    for name in versions:
        row = rows[name]
        print(f"ema update {name:5s} {row['cpu_ms']:8.2f} ms cpu ({row['wall_ms']:8.2f} wall), "
              f"{row['kernels']} kernels, "
              f"{tensors} tensors", file=sys.stderr)
    print(f"loop/flat x{rows['cpu_gain']:.2f} cpu, x{rows['wall_gain']:.2f} wall", file=sys.stderr)
    _common.emit({"benchmark": "ema", "model": model_cfg["name"], "tensors": tensors,
                  "parameters": int(sum(p.size for p in model.parameters())), "rounds": args.rounds,
                  "repeats": args.repeats, "rows": rows, "env": _common.environment(device)}, args.json_out)
    return 0


def _config(args):
    if not args.config:
        return None
    from passl.config import load_config
    return load_config(args.config, args.override)


_NO_KERNEL = ("reshape", "reshape_", "view_shape", "flatten")   # metadata only on a contiguous tensor


def _dispatched(fn):
    """Kernels one ``fn()`` launches through paddle._C_ops (lerp, cast, concat, ...; reshapes, which
    only relabel a contiguous tensor, and the Tensor.set_value copies of the loop are not counted)."""
    import paddle
    calls = [0]
    ops = paddle._C_ops
    names = [n for n in dir(ops) if not n.startswith("_") and callable(getattr(ops, n))]
    originals = {n: getattr(ops, n) for n in names}

    def wrap(name, original):
        def counted(*a, **k):
            calls[0] += name not in _NO_KERNEL
            return original(*a, **k)
        return counted
    try:
        for name, original in originals.items():
            setattr(ops, name, wrap(name, original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(ops, name, original)
    return calls[0]


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(main)
