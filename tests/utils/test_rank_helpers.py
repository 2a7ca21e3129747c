"""Rank helpers and collectives in one process (several processes: tests/engine/test_distributed.py)."""
import warnings

import paddle

from passl.utils import distributed as du


def test_rank_and_world_size_come_from_the_launcher(monkeypatch):
    for key in ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID"):
        monkeypatch.delenv(key, raising=False)
    assert (du.world_size(), du.rank()) == (1, 0)
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "8")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "3")
    assert (du.world_size(), du.rank()) == (8, 3)


def test_one_process_needs_no_collectives(monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    du.init_distributed()
    assert not paddle.distributed.is_initialized()
    counts = paddle.to_tensor([3, 1], dtype="int64")
    assert du.all_reduce(counts, "min") is counts and counts.numpy().tolist() == [3, 1]
    assert du.gather_objects({"a": 1}) == [{"a": 1}]


def test_unwrap_data_parallel():
    model = paddle.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = paddle.DataParallel(model)
    assert du.unwrap(wrapped) is model and du.unwrap(model) is model
