"""Environment set before paddle loads: all cores for OpenMP, MKL's fast path on AMD, quiet native logs;
whatever the user already set is kept."""
import os

from passl.utils import cpu_threads


def test_fills_in_what_is_unset(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_vendor", lambda: "GenuineIntel")
    env = {}
    applied = cpu_threads.configure_cpu_threads(env)
    assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert env["GLOG_minloglevel"] == "2"
    assert "MKL_DEBUG_CPU_TYPE" not in env          # forcing the AVX2 path slows AVX-512 Intel CPUs
    assert applied == env


def test_amd_gets_the_mkl_switch(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_vendor", lambda: "AuthenticAMD")
    env = {}
    cpu_threads.configure_cpu_threads(env)
    assert env["MKL_DEBUG_CPU_TYPE"] == "5"


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
        assert cpu_threads.configure_cpu_kernels({}) is True
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
        assert cpu_threads.configure_cpu_kernels({cpu_threads.STRIDE_FLAG: "1"}) is False
        assert _stride_flag() is True
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
