"""Guards: output-dir and disk checks, the device-side NaN/stop flags, signal handling, the message
of a failing or orphaned rank. (The whole loop under these guards: test_trainer.py, test_distributed.py.)"""
import logging
import os
import signal

import numpy as np
import paddle
import pytest

from passl.engine import guards
from passl.engine.guards import (NonFiniteLoss, RunFlags, check_disk, claim_output_dir, explain_failure,
                                 failure_message, nonfinite_message, stop_on_signals)
from passl.errors import ConfigError, PasslError, WriteError


def _snapshot(directory):
    """{relative path: bytes} of every file below ``directory``."""
    out = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_a_fresh_run_never_starts_over_an_earlier_one(tmp_path):
    out = tmp_path / "run"
    with claim_output_dir(str(out)):
        assert os.listdir(out) == [".lock"]                     # created; the probe file is gone
    for name, data in (("metrics.jsonl", b'{"epoch": 1}\n'), ("epoch_0001.pdckpt", b"ckpt"), ("config.yaml", b"a: 1\n")):
        (out / name).write_bytes(data)
    before = _snapshot(out)
    with pytest.raises(PasslError) as caught:
        with claim_output_dir(str(out)):
            pass
    message = str(caught.value)
    assert message.startswith(f"output_dir {out} holds a run (epoch_0001.pdckpt, metrics.jsonl): continue it with "
                              "--resume, or pass --overwrite to move it to")
    assert _snapshot(out) == before                             # nothing touched, not even the lock file
    with claim_output_dir(str(out), resume=True):               # --resume continues it
        pass
    assert {k: v for k, v in _snapshot(out).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
    notes = []
    with claim_output_dir(str(out), overwrite=True, log=notes.append):
        assert os.listdir(out) == [".lock"]                     # a new, empty folder
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(moved) == 1 and notes == [f"--overwrite: moved the earlier run in {out} to {tmp_path / moved[0]}"]
    assert {k: v for k, v in _snapshot(tmp_path / moved[0]).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}     # moved whole, nothing deleted


def test_temporaries_of_killed_writes_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".latest.pdckpt.a1b2c3d4.tmp.pdckpt", ".config.yaml.zz_9yy8x.tmp.yaml"]
    kept = [".hidden_notes.txt", ".latest.pdckpt.a1b2c3d4.tmp.npy", "notes.tmp.txt"]
    for name in stale + kept:
        (out / name).write_bytes(b"x" * 10)
    notes = []
    with claim_output_dir(str(out), resume=True, log=notes.append):
        pass
    assert sorted(os.listdir(out)) == sorted(kept)                 # and the lock file goes with the run
    assert notes and notes[0].startswith("removed 2 temporary file(s) of an interrupted write (20 bytes)")


def test_the_lock_stops_a_second_run_and_dies_with_its_holder(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    with claim_output_dir(str(out)):
        with pytest.raises(WriteError, match=rf"output_dir {out} is in use by another training run \(pid {os.getpid()} "):
            with claim_output_dir(str(out)):
                pass
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriteError, match="is in use by another training run"):
            with claim_output_dir(str(out)):
                pass
    finally:
        holder.kill()                                           # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with claim_output_dir(str(out)):                            # the OS released the lock with the process
        pass


def test_an_unwritable_output_dir_is_refused_before_anything(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"output_dir .*file/out is not writable \(Not a directory\); .*-o output_dir=\.\.\."):
        with claim_output_dir(str(blocker / "out")):
            pass
    with claim_output_dir(str(blocker / "out"), main=False):    # other ranks never touch the disk
        pass


def test_disk_check_counts_every_file_a_run_keeps_at_its_peak(tmp_path, monkeypatch):
    model = paddle.nn.Linear(1024, 1024)                          # ~1.05 M parameters, 4 MiB each copy
    weights = (1024 * 1024 + 1024) * 4

    class Usage:
        free = 0
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: Usage)
    for with_ema, keep_last in ((False, 3), (True, 3), (True, 0)):
        checkpoint = weights * (4 if with_ema else 3)             # model, Adam's moments, EMA
        # keep_last epoch files (at least latest), the best one, the one being written; best_model.pdparams
        # and .safetensors, one of them twice while it is replaced; 64 MiB for logs
        need = (max(keep_last, 1) + 2) * checkpoint + 3 * weights + (64 << 20)
        Usage.free = need
        check_disk(str(tmp_path), model, with_ema, keep_last)     # exactly enough
        Usage.free = need - 1
        with pytest.raises(WriteError) as caught:
            check_disk(str(tmp_path), model, with_ema, keep_last)
        assert f"train.keep_last {keep_last}" in str(caught.value) and "64.0 MiB for logs" in str(caught.value)
        check_disk(str(tmp_path), model, with_ema, keep_last, main=False)
    (tmp_path / "latest.pdckpt").write_bytes(b"x" * 1000)          # a resumed run's files count as held
    os.link(tmp_path / "latest.pdckpt", tmp_path / "epoch_0001.pdckpt")   # a hard link once
    Usage.free = need - 1000
    check_disk(str(tmp_path), model, True, 0)


def test_flags_report_the_first_non_finite_step():
    flags = RunFlags()
    for step, value in ((0, 1.0), (1, float("nan")), (2, 2.0), (3, float("inf"))):
        flags.watch(paddle.to_tensor(value), step)
    with pytest.raises(NonFiniteLoss) as caught:
        flags.sync()
    assert caught.value.step == 1
    healthy = RunFlags()
    healthy.watch(paddle.to_tensor(0.5, dtype="float16"), 7)
    assert healthy.sync() is False


def test_a_stop_request_acts_at_once_in_a_single_process():
    flags = RunFlags()
    assert not flags.stop_now() and flags.sync() is False
    flags.request_stop()
    assert flags.stop_now() and flags.sync() is True and flags.agree_to_stop() is True


def test_signals_request_a_stop_then_abort_and_handlers_come_back():
    flags, log = RunFlags(), logging.getLogger("test_guards")
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(flags, log):
        os.kill(os.getpid(), signal.SIGTERM)
        assert flags.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)               # the second signal aborts without saving
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_a_signal_ignored_at_start_stays_ignored(caplog):
    # a shell script's `python tools/train.py &` starts the run with SIGINT ignored
    flags, log = RunFlags(), logging.getLogger("test_guards")
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # terminal_sigint puts the handler back
    with caplog.at_level(logging.WARNING, logger="test_guards"), stop_on_signals(flags, log):
        os.kill(os.getpid(), signal.SIGINT)
        assert not flags.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)               # a scheduler's stop still saves and stops
        assert flags.stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)           # and a second one aborts
    assert "send the signal again to abort" in caplog.text and "Ctrl-C" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_nonfinite_message_names_the_step_and_the_last_good_checkpoint(tmp_path):
    assert "global step 4 (epoch 2)" in nonfinite_message(4, 1, str(tmp_path))
    assert "Last good checkpoint: none yet" in nonfinite_message(4, 1, str(tmp_path))
    (tmp_path / "latest.pdckpt").write_bytes(b"")
    assert f"Last good checkpoint: {tmp_path / 'latest.pdckpt'}." in nonfinite_message(4, 1, str(tmp_path))


def test_failure_messages_tell_a_lost_peer_from_a_failure():
    lost = failure_message(RuntimeError("gloo: connection closed by peer\nmore"), 0, 2)
    assert "rank 0 of 2: lost contact with the other processes" in lost and "another rank probably died" in lost
    assert "more" not in lost
    own = failure_message(RuntimeError("simulated crash on rank 1"), 1, 2)
    assert own.startswith("rank 1 of 2 failed: RuntimeError: simulated crash on rank 1")
    assert "log/workerlog.1" in own


def test_explain_failure_logs_only_with_several_processes(monkeypatch, caplog):
    log = logging.getLogger("test_guards.explain")
    with caplog.at_level(logging.ERROR, logger=log.name):
        with pytest.raises(RuntimeError):
            with explain_failure(log):
                raise RuntimeError("boom")
        assert not caplog.records
        monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
        monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
        with pytest.raises(RuntimeError):
            with explain_failure(log):
                raise RuntimeError("boom")
        assert [r.getMessage() for r in caplog.records] == [failure_message(RuntimeError("boom"), 1, 2)]
        with pytest.raises(ConfigError):                         # a PasslError explains itself
            with explain_failure(log):
                raise ConfigError("bad key")
        assert len(caplog.records) == 1
        lost = RuntimeError("[pair.cc:584] TIMEOUT self_rank = 1 pair_rank = 0")
        with pytest.raises(PasslError) as caught:                # a lost peer: one line, the cause is elsewhere
            with explain_failure(log):
                raise lost
        assert str(caught.value) == failure_message(lost, 1, 2) and caught.value.__cause__ is None
        assert len(caplog.records) == 1


def _step(flags, step, loss, skipped):
    flags.watch(paddle.to_tensor(loss), step)
    flags.end_step(step, paddle.to_tensor([skipped]))


def test_with_a_loss_scaler_only_consecutive_non_finite_losses_stop_the_run():
    flags = RunFlags(max_nonfinite=3)
    for step, loss in enumerate([1.0, float("nan"), float("nan"), 2.0, float("inf")]):
        _step(flags, step, loss, not np.isfinite(loss))
    assert flags.sync() is False                     # never 3 in a row
    assert (flags.skipped, flags.skipped_in_interval, flags.skipped_in_epoch) == (3, 3, 3)
    _step(flags, 5, 1.0, True)                       # gradient overflow with a finite loss: skipped, no streak
    assert flags.sync() is False and (flags.skipped, flags.skipped_in_interval, flags.skipped_in_epoch) == (4, 1, 4)
    flags.new_epoch()
    for step in (6, 7, 8, 9):
        _step(flags, step, float("nan"), True)
    with pytest.raises(NonFiniteLoss) as caught:
        flags.sync()
    assert (caught.value.step, caught.value.consecutive) == (8, 3)   # the third in a row
    assert flags.skipped_in_epoch == 4


def test_a_nonfinite_streak_is_named_in_the_message(tmp_path):
    text = nonfinite_message(8, 2, str(tmp_path), consecutive=3)
    assert "NaN or infinite in 3 consecutive steps up to global step 8 (epoch 3" in text
    assert "Last good checkpoint: none yet" in text
