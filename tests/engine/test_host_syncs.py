"""No device-to-host copy in a training step outside the log steps, and no loader worker left behind
by a pass that stops early. Copies are counted by wrapping every Tensor method that reads values back
to the host (numpy, item, tolist, float/int/bool/index conversion, format, __array__, cpu)."""
import contextlib
import os

import numpy as np
import paddle
import pytest
from engine_helpers import child_processes, tiny_config

from passl.config import load_config
from passl.data.loader import Loader
from passl.engine import guards, logging as engine_logging
from passl.engine.setup import build_run, start_session
from passl.engine.trainer import train_one_epoch

_READS = ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__", "__array__",
          "cpu")


class HostReads:
    """Counts device-to-host reads (the outermost call only), split into inside and outside log steps."""

    def __init__(self, monkeypatch):
        self.outside, self.inside, self.where = [], 0, []
        self._depth, self._logging = 0, 0
        for name in _READS:
            monkeypatch.setattr(paddle.Tensor, name, self._counting(getattr(paddle.Tensor, name), name))

    def _counting(self, method, name):
        reads = self

        def counted(tensor, *args, **kwargs):
            if reads._depth == 0:
                if reads._logging:
                    reads.inside += 1
                else:
                    import traceback
                    reads.outside.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
            reads._depth += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                reads._depth -= 1
        return counted

    @contextlib.contextmanager
    def logging(self):
        self._logging += 1
        try:
            yield
        finally:
            self._logging -= 1

    def around(self, monkeypatch, owner, name):
        """Reads inside ``owner.name`` count as log-step reads."""
        method = getattr(owner, name)
        reads = self

        def wrapped(*args, **kwargs):
            with reads.logging():
                return method(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)


def _run_with_erasing(tmp_path, train_root, **overrides):
    transforms = [{"name": "RandomResizedCrop", "size": 32, "scale": [0.5, 1.0]}, {"name": "RandomHorizontalFlip"},
                  {"name": "Normalize"}, {"name": "RandomErasing", "prob": 1.0, "mode": "pixel", "max_count": 2}]
    cfg = tiny_config(tmp_path, train_root, None, data__train__transforms=transforms, **overrides)
    return build_run(start_session(load_config(cfg)))


def test_a_training_epoch_reads_nothing_back_outside_its_log_steps(tmp_path, image_data, monkeypatch):
    train_root, _ = image_data
    run = _run_with_erasing(tmp_path, train_root, train__log_interval=1000)   # one log: the epoch's last step
    reads = HostReads(monkeypatch)
    reads.around(monkeypatch, guards.RunFlags, "sync")
    reads.around(monkeypatch, engine_logging.EpochReport, "log_interval")
    reads.around(monkeypatch, engine_logging.EpochReport, "epoch_loss")
    with run.metrics:
        train_one_epoch(run)
    assert run.progress.global_step == 3                  # 12 images, batch 4: three optimizer steps
    assert reads.outside == [], "host reads in the step:\n" + "\n".join(f"{n} at\n{w}" for n, w in reads.outside)
    assert reads.inside > 0                               # the counter sees the log step's reads


def test_the_counter_sees_a_read_in_the_step(tmp_path, image_data, monkeypatch):
    """The same count fails as soon as the step reads a value back (here: a float() of the loss)."""
    import passl.engine.trainer as trainer
    train_root, _ = image_data
    run = _run_with_erasing(tmp_path, train_root, train__log_interval=1000)
    reads = HostReads(monkeypatch)
    reads.around(monkeypatch, guards.RunFlags, "sync")
    reads.around(monkeypatch, engine_logging.EpochReport, "log_interval")
    reads.around(monkeypatch, engine_logging.EpochReport, "epoch_loss")
    step = trainer.train_step

    def reading_step(run, batch, update):
        losses = step(run, batch, update)
        float(losses["loss"])
        return losses
    monkeypatch.setattr(trainer, "train_step", reading_step)
    with run.metrics:
        train_one_epoch(run)
    assert [name for name, _ in reads.outside] == ["__float__"] * 3


def test_stand_ins_for_bad_images_are_recorded_when_the_pass_ends(tmp_path, image_data, monkeypatch):
    """bad_image_index travels only in batches that hold a stand-in, and is read once, after the pass."""
    import shutil

    from passl.data import build_dataset, collate_fn
    train_root, _ = image_data
    copy = tmp_path / "train"
    shutil.copytree(train_root, copy)
    broken = copy / sorted(os.listdir(copy))[0] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    split = {"dataset": {"name": "ImageFolder", "root": str(copy)}, "label_store": None,
             "transforms": [{"name": "Normalize"}], "skip_bad_images": True}
    loader = Loader(build_dataset(split, "train", 3, (2, 2)), 4, collate_fn, num_workers=2)
    loader.set_epoch(0)
    reads = HostReads(monkeypatch)
    batches = iter(loader)
    first = next(batches)
    assert "bad_image_index" not in first                 # taken out; only 3 of 4 batches never had it
    for _ in batches:
        assert reads.outside == [] and loader.dataset.bad_images == []
    assert loader.dataset.bad_images == [str(broken)]
    assert len(reads.outside) == 1                        # one read, when the pass ended


class _Items(paddle.io.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"image": np.full((3, 2, 2), index, np.float32)}


def _stack(items):
    return {k: np.stack([item[k] for item in items]) for k in items[0]}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
@pytest.mark.parametrize("how", ["break", "error", "close"])
def test_workers_stop_when_a_pass_is_left_early(how):
    before = child_processes()
    loader = Loader(_Items(), 2, _stack, num_workers=2)
    loader.set_epoch(0)
    running = []

    def leave_early():
        batches = iter(loader)
        for index, _ in enumerate(batches):
            running.append(child_processes() - before)
            if index == 1:
                if how == "error":
                    raise RuntimeError("a failing step")
                if how == "close":
                    batches.close()           # a pass still referenced (e.g. by a trainer) is closed
                    return batches
                return None                   # "break": the pass is dropped mid-way

    if how == "error":
        with pytest.raises(RuntimeError, match="failing step") as failure:
            leave_early()
        del failure                           # its traceback holds the pass
    else:
        held = leave_early()
    assert all(len(workers) == 2 for workers in running)
    assert child_processes() - before == set()
