"""CPU settings: the environment set before paddle loads (all cores for OpenMP, MKL's fast path on AMD,
quiet native logs) and the runtime settings made after (contiguous kernels, malloc reuse); whatever the
user already set is kept."""
import os
import subprocess
import sys

import pytest

from passl.utils import cpu_threads


def test_fills_in_what_is_unset(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_vendor", lambda: "GenuineIntel")
    env = {}
    applied = cpu_threads.configure_cpu_threads(env)
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert env["GLOG_minloglevel"] == "2"
    assert "MKL_DEBUG_CPU_TYPE" not in env          # forcing the AVX2 path slows AVX-512 Intel CPUs
    assert applied == env


ZEN3 = {"fma", "avx", "avx2", "sse4_2"}
ZEN4 = ZEN3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"}


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", ZEN4, "7"),                      # MKL's AVX-512 kernels
    ("AuthenticAMD", ZEN3, "5"),                      # AVX2
    ("AuthenticAMD", ZEN4 - {"avx512vl"}, "5"),       # a subset missing: 7 would die of SIGILL
    ("AuthenticAMD", {"sse4_2", "avx"}, None),        # no AVX2: MKL's own choice
    ("GenuineIntel", ZEN4, None),                     # MKL picks well on Intel; forcing AVX2 slows AVX-512
    ("", set(), None),
])
def test_mkl_path_follows_vendor_and_flags(monkeypatch, vendor, flags, expected):
    monkeypatch.setattr(cpu_threads, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_threads, "cpu_flags", lambda: frozenset(flags))
    env = {}
    cpu_threads.configure_cpu_threads(env)
    assert env.get("MKL_DEBUG_CPU_TYPE") == expected


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo (Linux)")
def test_reads_this_machines_cpu():
    flags = cpu_threads.cpu_flags()
    assert cpu_threads.cpu_vendor() and cpu_threads.cpu_model() and flags
    assert "fpu" in flags or "sse2" in flags       # every x86-64 processor lists them


def test_the_chosen_mkl_path_runs_here(tmp_path):
    """The setting picked for this machine runs a matrix product correctly (a wrong one is SIGILL)."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    cpu_threads.configure_cpu_threads(env)
    code = ("import numpy as np, paddle; paddle.set_device('cpu'); r = np.random.RandomState(0);"
            "a = r.randn(300, 200).astype('float32'); b = r.randn(200, 100).astype('float32');"
            "out = paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy();"
            "print(float(np.abs(out - a.astype('f8') @ b.astype('f8')).max()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (env.get("MKL_DEBUG_CPU_TYPE"), proc.stderr[-2000:])
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-3


def test_user_values_are_kept(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_vendor", lambda: "AuthenticAMD")
    env = {"OMP_NUM_THREADS": "1", "MKL_DEBUG_CPU_TYPE": "4", "GLOG_minloglevel": "0"}
    applied = cpu_threads.configure_cpu_threads(env)
    assert applied == {} and env == {"OMP_NUM_THREADS": "1", "MKL_DEBUG_CPU_TYPE": "4", "GLOG_minloglevel": "0"}


def _stride_flag():
    import paddle
    return paddle.get_flags([cpu_threads.STRIDE_FLAG])[cpu_threads.STRIDE_FLAG]


def test_cpu_runs_use_contiguous_kernels():
    import paddle
    before = _stride_flag()
    try:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: True})
        assert cpu_threads.STRIDE_FLAG in cpu_threads.configure_cpu_runtime({})
        assert _stride_flag() is False
        x = paddle.arange(6, dtype="float32").reshape([2, 3])
        assert x.transpose([1, 0]).is_contiguous()      # a copy, not a strided view
    finally:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: before})


def test_user_stride_flag_is_kept():
    import paddle
    before = _stride_flag()
    try:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: True})
        changed = cpu_threads.configure_cpu_runtime({cpu_threads.STRIDE_FLAG: "1", "MALLOC_TOP_PAD_": "0"})
        assert changed == [] and _stride_flag() is True
    finally:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: before})


def test_select_device_cpu_sets_the_kernels(monkeypatch):
    import paddle
    from passl.utils import distributed
    monkeypatch.delenv(cpu_threads.STRIDE_FLAG, raising=False)
    before = _stride_flag()
    try:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: True})
        assert distributed.select_device("cpu", log=None) == "cpu"
        assert _stride_flag() is False
    finally:
        paddle.set_flags({cpu_threads.STRIDE_FLAG: before})


REUSE_PROBE = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
if {keep}:
    from passl.utils.cpu_threads import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_a_64mb_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_64mb_block()
print(faults_of_a_64mb_block())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults(repo_root):
    """A second 64 MB block faults in all its 16k pages again by default, and none once freed memory is kept."""
    def faults(keep):
        code = REUSE_PROBE.format(root=repo_root, keep=keep)
        return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert faults(False) > 10000
    assert faults(True) < 1000


class DeviceCalls:
    """select_device on a machine whose Paddle sees ``gpus`` GPUs (mocked: this build has none), with
    paddle.set_device and the math-library thread setter recorded instead of applied."""

    def __init__(self, monkeypatch, gpus):
        import paddle
        from paddle.base import core

        from passl.utils import distributed
        self.devices, self.threads = [], []
        monkeypatch.setattr(distributed, "cuda_available", lambda: gpus > 0)
        monkeypatch.setattr(core, "is_compiled_with_cuda", lambda: gpus > 0)   # what ParallelEnv asks
        monkeypatch.setattr(paddle, "set_device", self.devices.append)
        monkeypatch.setattr(core, "set_num_threads", self.threads.append)
        monkeypatch.setattr(cpu_threads, "configure_cpu_runtime", lambda environ=None: [])
        monkeypatch.setattr(distributed, "configure_cpu_runtime", lambda environ=None: [])
        self.select = distributed.select_device


def test_threads_differ_by_device(monkeypatch):
    """All cores for a CPU run; Paddle's default of one math thread per process (and per loader worker,
    through the environment they inherit) for a GPU run, when the all-cores value was ours."""
    cores = str(cpu_threads.available_cores())
    monkeypatch.setenv("OMP_NUM_THREADS", cores)
    monkeypatch.setattr(cpu_threads, "_SET_HERE", {"OMP_NUM_THREADS": cores})
    calls = DeviceCalls(monkeypatch, gpus=0)
    assert calls.select("auto", log=None) == "cpu"
    assert os.environ["OMP_NUM_THREADS"] == cores and calls.threads == [] and calls.devices == ["cpu"]
    calls = DeviceCalls(monkeypatch, gpus=8)
    assert calls.select("auto", log=None) == "gpu"
    assert os.environ["OMP_NUM_THREADS"] == "1" and calls.threads == [1]


def test_a_gpu_run_keeps_the_users_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    monkeypatch.setattr(cpu_threads, "_SET_HERE", {})       # the user's value, not configure_cpu_threads'
    calls = DeviceCalls(monkeypatch, gpus=8)
    calls.select("gpu", log=None)
    assert os.environ["OMP_NUM_THREADS"] == "6" and calls.threads == []


def test_the_gpu_of_a_rank_is_the_one_the_launcher_selected(monkeypatch):
    """launch --gpus 4,5,6,7 runs rank 1 with PADDLE_LOCAL_RANK=1 and FLAGS_selected_gpus=5."""
    monkeypatch.setenv("PADDLE_LOCAL_RANK", "1")
    monkeypatch.setenv("FLAGS_selected_gpus", "5")
    calls = DeviceCalls(monkeypatch, gpus=8)
    calls.select("gpu", log=None)
    assert calls.devices == ["gpu:5"]
