"""Guards: output-dir and disk checks, the device-side NaN/stop flags, signal handling, the message
of a failing or orphaned rank. (The whole loop under these guards: test_trainer.py, test_distributed.py.)"""
import logging
import os
import signal

import paddle
import pytest

from passl.engine import guards
from passl.engine.guards import (NonFiniteLoss, RunFlags, check_disk, explain_failure, failure_message,
                                 nonfinite_message, prepare_output_dir, stop_on_signals)
from passl.errors import ConfigError, PasslError


def test_output_dir_is_created_proven_writable_and_a_fresh_run_restarts_metrics(tmp_path):
    out = tmp_path / "a" / "b"
    prepare_output_dir(str(out))
    assert os.listdir(out) == []                                  # the probe file is gone
    (out / "metrics.jsonl").write_text("{}\n")
    prepare_output_dir(str(out), fresh=False)
    assert (out / "metrics.jsonl").exists()                      # --resume keeps the history
    prepare_output_dir(str(out), fresh=True)
    assert not (out / "metrics.jsonl").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PasslError, match="not writable.*-o output_dir"):
        prepare_output_dir(str(blocker / "out"))
    prepare_output_dir(str(blocker / "out"), main=False)         # other ranks never touch the disk


def test_disk_check_counts_model_optimizer_and_ema(tmp_path, monkeypatch):
    model = paddle.nn.Linear(1024, 1024)                          # ~1.05 M parameters, 4 MiB each copy
    numel = 1024 * 1024 + 1024

    class Usage:
        free = 0
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: Usage)
    for with_ema, copies in ((False, 3), (True, 4)):
        need = 2 * numel * 4 * copies + (64 << 20)
        Usage.free = need
        check_disk(str(tmp_path), model, with_ema)                # exactly enough
        Usage.free = need - 1
        with pytest.raises(PasslError, match="GiB free"):
            check_disk(str(tmp_path), model, with_ema)
        check_disk(str(tmp_path), model, with_ema, main=False)


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
