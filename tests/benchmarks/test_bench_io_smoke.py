"""benchmarks/bench_io.py runs end to end on a small file and prints the documented keys (no timing
or memory assertions: the numbers depend on the machine)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_io_small(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_io.py"), "--mb", "2",
                           "--tensors", "4", "--readers", "paddle.load,passl.io .safetensors",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "io" and set(result["file_mb"]) == {"ckpt.pdckpt", "weights.pth",
                                                                      "weights.safetensors"}
    assert all(1.9 < size < 2.2 for size in result["file_mb"].values())
    assert sorted(result["readers"]) == ["paddle.load", "passl.io .safetensors"]
    for reader in result["readers"].values():
        assert all(isinstance(reader[k], float) and math.isfinite(reader[k]) for k in
                   ("wall_s", "cpu_s", "extra_mb", "kept_mb", "extra_per_file_size"))
