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
