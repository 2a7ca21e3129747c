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


def _bn_model():
    from passl.models.layers import ConvStem
    paddle.seed(0)
    model = paddle.nn.Sequential(ConvStem(3, 8, 4, width=4), paddle.nn.Flatten(), paddle.nn.Linear(8 * 4, 2))
    model.train()
    model(paddle.rand([2, 3, 8, 8]))            # running statistics move away from 0 and 1
    return model


def test_bn_statistics_name_every_running_mean_and_variance():
    stats = du.bn_statistics(_bn_model())
    assert sorted(stats) == [f"0.bn{i}.{kind}" for i in (1, 2, 3) for kind in ("_mean", "_variance")]


def test_one_process_keeps_its_bn_statistics(monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    model = _bn_model()
    before = {k: v.numpy().copy() for k, v in du.bn_statistics(model).items()}
    assert du.average_bn_statistics(model, None) == 6
    for key, value in du.bn_statistics(model).items():
        assert (value.numpy() == before[key]).all(), key


def test_sync_bn_converts_on_gpus_only(monkeypatch):
    import pytest

    from passl.errors import ConfigError
    model = _bn_model()
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    messages = []
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    assert du.convert_sync_batchnorm(model, "gpu", log=messages.append) is model      # one process: nothing to sync
    assert "one process" in messages[-1]
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on GPUs only .* -o model.sync_bn=false"):
        du.convert_sync_batchnorm(model, "cpu")
    # the conversion itself runs anywhere (its forward needs a GPU): same parameters, buffers and names
    synced = du.convert_sync_batchnorm(model, "gpu", log=messages.append)
    assert "3 BatchNorm layers use SyncBatchNorm over 2 processes" in messages[-1]
    assert isinstance(synced[0].bn1, paddle.nn.SyncBatchNorm)
    assert list(synced.state_dict()) == list(state)
    for key, value in synced.state_dict().items():
        assert (value.numpy() == state[key]).all(), key
    assert du.bn_statistics(synced) == {}            # computed over all processes: nothing left to average
