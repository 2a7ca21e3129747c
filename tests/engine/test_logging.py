"""What a run prints: the step and epoch lines, the per-epoch report (device meters read once per
interval, data wait, throughput, eta), and the list of skipped images."""
import logging

import numpy as np
import paddle
import pytest

from passl.engine import logging as run_logging
from passl.engine.logging import (DeviceMeter, EpochReport, format_epoch_line, format_eta, format_step_line,
                                  report_bad_images)


def test_step_line():
    line = format_step_line(epoch=1, epochs=3, step_in_epoch=4, steps_per_epoch=10, global_step=14, lr=1.25e-3,
                            means={"loss_dense": 0.5, "loss": 1.5, "loss_cls": 1.0}, samples_per_s=123.45,
                            data_wait=0.25, eta_seconds=3725)
    assert line == ("epoch 2/3 step 4/10 (global 14)  lr 1.250e-03  loss 1.5000  loss_cls 1.0000  "
                    "loss_dense 0.5000  123.5 samples/s  data wait 25%  eta 1:02:05")


def test_epoch_line_and_eta():
    record = {"epoch": 2, "train_loss": 1.23456, "lr": 0.00123456, "val_top1": 50.0, "wall_time": 12.5}
    assert format_epoch_line(record, True, "out/epoch_0002.pdckpt") == (
        "epoch 2  train_loss 1.2346  lr 0.001235  val_top1 50.0000  wall_time 12.5000  (best) -> out/epoch_0002.pdckpt")
    assert format_eta(2 * 86400 + 61) == "2d 0:01:01" and format_eta(-5) == "0:00:00"


def test_device_meter_means_and_resets():
    meter = DeviceMeter()
    assert meter.means() == {}
    for value in (1.0, 2.0, 6.0):
        meter.add({"loss": paddle.to_tensor(value), "half": paddle.to_tensor(value / 2, dtype="float16")})
    assert meter.means() == pytest.approx({"loss": 3.0, "half": 1.5})
    assert meter.means() == {}


def test_device_meter_leaves_out_micro_batches_whose_loss_is_not_finite():
    """A step the loss scaler skipped (non-finite loss) does not turn the logged means into nan."""
    meter = DeviceMeter()
    for loss, part in ((1.0, 0.5), (float("nan"), 0.25), (3.0, 1.5), (float("inf"), 2.0)):
        meter.add({"loss": paddle.to_tensor(loss), "loss_cls": paddle.to_tensor(part)})
    assert meter.means() == pytest.approx({"loss": 2.0, "loss_cls": 1.0})
    meter.add({"loss": paddle.to_tensor(float("nan")), "loss_cls": paddle.to_tensor(1.0)})
    means = meter.means()                      # nothing finite to average: said as nan, not as 0
    assert np.isnan(means["loss"]) and np.isnan(means["loss_cls"])


class Clock:
    def __init__(self):
        self.now = 100.0

    def time(self):
        return self.now


class Scalars:
    def __init__(self):
        self.written = []

    def scalars(self, values, step):
        self.written.append((values, step))


def test_epoch_report_interval_line(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(run_logging, "time", clock)
    metrics, log = Scalars(), logging.getLogger("test_logging.report")

    def batches():
        for i in range(4):
            clock.now += 1.0          # 1 s waiting for each batch
            yield i

    with caplog.at_level(logging.INFO, logger=log.name):
        with EpochReport(log, metrics, True, epoch=0, epochs=2, steps_per_epoch=4, global_batch=8) as report:
            assert report.bar is None                         # not a terminal
            for i in report.timed(batches()):
                report.add({"loss": paddle.to_tensor(float(i)), "loss_cls": paddle.to_tensor(1.0)})
                clock.now += 3.0      # 3 s computing
                report.step_done()
                if i == 1:
                    report.log_interval(step_in_epoch=2, global_step=2, lr=0.5)
            assert report.epoch_loss() == pytest.approx(1.5)
    # first interval: 2 steps in 8 s, 2 s of it waiting; 6 steps left at 4 s each
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 1/2 step 2/4 (global 2)  lr 5.000e-01  loss 0.5000  loss_cls 1.0000  2.0 samples/s  data wait 25%  "
        "eta 0:00:24"]
    assert metrics.written == [({"loss": 0.5, "loss_cls": 1.0, "lr": 0.5}, 2)]


def test_only_the_main_process_prints_the_interval(caplog):
    log = logging.getLogger("test_logging.other_rank")
    with caplog.at_level(logging.INFO, logger=log.name):
        with EpochReport(log, Scalars(), False, epoch=0, epochs=1, steps_per_epoch=1, global_batch=1) as report:
            report.add({"loss": paddle.to_tensor(1.0)})
            report.step_done()
            report.log_interval(1, 1, 0.1)
            assert report.interval.means() == {}             # read and reset on every rank all the same
    assert not caplog.records


def test_bad_images_are_listed_once_each(tmp_path, caplog):
    class Dataset:
        def __init__(self, bad_images):
            self.bad_images = bad_images
    log = logging.getLogger("test_logging.bad")
    with caplog.at_level(logging.WARNING, logger=log.name):
        report_bad_images({"train": Dataset(["b.png", "a.png", "b.png"]), "val": Dataset([])}, str(tmp_path), log, True)
    assert (tmp_path / "bad_images_train.txt").read_text() == "a.png\nb.png\n"
    assert not (tmp_path / "bad_images_val.txt").exists()
    assert "2 undecodable train image(s) were skipped (skip_bad_images: true), e.g. a.png" in caplog.text


def test_eta_counts_the_steps_left_from_the_position_in_the_epochs(monkeypatch, caplog):
    """Resumed with another global batch, the global step counts steps of another length: the ETA does not
    use it. Epoch 3 of 4, step 1 of 5 done in 2 s: 4 + 5 steps left at 2 s each."""
    clock = Clock()
    monkeypatch.setattr(run_logging, "time", clock)
    log = logging.getLogger("test_logging.eta")
    with caplog.at_level(logging.INFO, logger=log.name):
        with EpochReport(log, Scalars(), True, epoch=2, epochs=4, steps_per_epoch=5, global_batch=8) as report:
            report.add({"loss": paddle.to_tensor(1.0)})
            clock.now += 2.0
            report.step_done()
            report.log_interval(step_in_epoch=1, global_step=31, lr=0.1)
    assert caplog.records[0].getMessage().endswith("eta 0:00:18")
