"""Reading a large weights / checkpoint file: wall time, CPU time and peak memory of each reader.

Writes a synthetic state dict of ``--mb`` MiB of float32 in ``--tensors`` tensors (lvvit_l's weights
are ~574 MiB in 300 tensors) as a trainer-style checkpoint (``paddle.save`` of {"model": tensors,
"epoch"}), a ``.pth`` and a ``.safetensors``, then reads each in a fresh process so that peak
resident memory is that reader's alone (Linux: the peak mark is reset after the imports).
``extra_mb`` is the peak minus the memory before reading, ``kept_mb`` what the result holds; the ideal
is one copy of the data (``extra_mb`` / file size = 1). Prints one JSON object.

    python benchmarks/bench_io.py                     # 600 MiB, like lvvit_l
    python benchmarks/bench_io.py --mb 64 --tensors 50
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

READERS = {   # name -> (file, statement run on ``path``)
    "paddle.load": ("ckpt.pdckpt", "import paddle; obj = paddle.load(path)"),
    "passl.io numpy": ("ckpt.pdckpt", "from passl.io import read_state; obj = read_state(path)"),
    "passl.io to_paddle (load_file)": ("ckpt.pdckpt", "from passl.io import read_state; "
                                                      "obj = read_state(path, to_paddle=True)"),
    "passl.io .pth": ("weights.pth", "from passl.io import read_state; obj = read_state(path)"),
    "passl.io .safetensors": ("weights.safetensors", "from passl.io import read_state; obj = read_state(path)"),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mb", type=float, default=600.0, help="MiB of float32 weights")
    p.add_argument("--tensors", type=int, default=300, help="number of tensors")
    p.add_argument("--readers", default=",".join(READERS), help="comma list of " + ", ".join(READERS))
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    return p


def write_files(directory, mb, tensors):
    """The three files, from the same arrays. Returns {file name: MiB on disk}."""
    import numpy as np
    import paddle

    from passl.io import save_pth, write_safetensors
    per = max(int(mb * 2 ** 20 / 4 / tensors), 1)
    rng = np.random.default_rng(0)
    arrays = {f"blocks.{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(tensors)}
    paddle.save({"model": {k: paddle.to_tensor(v) for k, v in arrays.items()}, "epoch": 1},
                os.path.join(directory, "ckpt.pdckpt"))
    save_pth({"state_dict": arrays}, os.path.join(directory, "weights.pth"))
    write_safetensors(arrays, os.path.join(directory, "weights.safetensors"))
    return {name: os.path.getsize(os.path.join(directory, name)) / 2 ** 20
            for name in ("ckpt.pdckpt", "weights.pth", "weights.safetensors")}


def child(reader, path):
    """Run one reader in this (fresh) process and print its numbers as JSON."""
    _, statement = READERS[reader]
    import numpy  # noqa: F401  (imports happen before the baseline is taken)
    import paddle  # noqa: F401

    import passl.io  # noqa: F401
    base = _reset_peak()
    scope = {"path": path}
    start, cpu = time.perf_counter(), time.process_time()
    exec(statement, scope)   # the benchmark's own statements (READERS), never file content
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_kib("VmHWM")
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "extra_mb": (peak - base) / 1024.0,
                      "kept_mb": (_status_kib("VmRSS") - base) / 1024.0}))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so that imports do not count; returns RSS (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        return child(*args.child)
    directory = args.dir or tempfile.mkdtemp(prefix="bench_io_")
    os.makedirs(directory, exist_ok=True)
    try:
        sizes = write_files(directory, args.mb, args.tensors)
        results = {}
        for reader in args.readers.split(","):
            name, _ = READERS[reader]
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", reader,
                                   os.path.join(directory, name)], capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["extra_per_file_size"] = result["extra_mb"] / sizes[name]
            results[reader] = result
            print(f"{reader}: {result['wall_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU, "
                  f"+{result['extra_mb']:.0f} MiB ({result['extra_per_file_size']:.2f} x the file)", file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    out = {"benchmark": "io", "mb": args.mb, "tensors": args.tensors, "file_mb": sizes, "readers": results,
           "env": {"load_average": _common.load_average(), "cpu_model": _common.cpu_model(),
                   "python": sys.version.split()[0]}}
    _common.emit(out, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
