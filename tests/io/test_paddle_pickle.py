"""passl.io.paddle_pickle: paddle.save files and PASSL pickles read without running code.

paddle.load (which does run code) is the oracle for files written by paddle.save: on every such file
the restricted reader must give exactly what paddle.load gives."""
import collections
import pickle
import random

import numpy as np
import paddle
import pytest

from crafted import EvalPayload, Payload, assert_same
from passl.errors import CheckpointError
from passl.io import read_paddle, read_state


def _layer():
    paddle.seed(3)
    return paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4), paddle.nn.LayerNorm(4))


def _checkpoint():
    """Everything the trainer puts in a .pdckpt, in the types paddle.save sees."""
    model = _layer()
    opt = paddle.optimizer.AdamW(learning_rate=0.01, parameters=model.parameters())
    model(paddle.ones([2, 3])).mean().backward()
    opt.step()
    np.random.seed(1)
    random.seed(2)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best": {"top1": np.float64(0.5)},
            "rng": {"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "config": {"model": {"name": "x", "img_size": [32, 32]}, "flags": (True, None, 1.5e-3, "s")},
            "scaler": {"scale": np.array([65536.0], np.float32), "incr_count": 7},
            "plain": np.arange(5, dtype=np.int16), "od": collections.OrderedDict(a=1)}


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_trainer_checkpoint_reads_as_paddle_load_does(tmp_path, protocol):
    path = str(tmp_path / "a.pdckpt")
    paddle.save(_checkpoint(), path, protocol=protocol)
    assert_same(read_paddle(path, to_paddle=True), paddle.load(path))
    plain = read_paddle(path)
    assert isinstance(plain["model"]["0.weight"], np.ndarray) and plain["epoch"] == 3
    assert plain["rng"]["paddle"][0].seed == paddle.get_rng_state()[0].current_seed()


def test_generator_state_restores_the_stream(tmp_path):
    paddle.seed(11)
    path = str(tmp_path / "rng.pdckpt")
    paddle.save({"rng": paddle.get_rng_state(), "w": paddle.ones([1])}, path)
    expected = paddle.rand([3]).numpy()
    paddle.seed(99)
    paddle.set_rng_state(read_paddle(path, to_paddle=True)["rng"])
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), expected)


def test_state_dict_and_dense_tensor_layouts(tmp_path):
    sd_path, dense_path = str(tmp_path / "m.pdparams"), str(tmp_path / "t.pdtensor")
    paddle.save(_layer().state_dict(), sd_path)                        # name-table layout
    assert_same(read_paddle(sd_path, to_paddle=True), paddle.load(sd_path))
    assert "StructuredToParameterName@@" not in read_paddle(sd_path)
    # what paddle.save's reduce_DenseTensor returns (saving a DenseTensor itself crashes Paddle 3.3 on the CPU)
    with open(dense_path, "wb") as f:
        pickle.dump({"t": _DenseTensor(np.arange(6, dtype=np.float32).reshape(2, 3))}, f, protocol=4)
    np.testing.assert_array_equal(read_paddle(dense_path)["t"], np.arange(6).reshape(2, 3))
    assert_same(read_paddle(dense_path, to_paddle=True), paddle.load(dense_path))


class _DenseTensor:
    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (eval, ("data", {"data": self.data}))


def test_split_big_arrays_are_joined(tmp_path):
    """paddle.save with protocol 2/3 splits arrays over 2**30 bytes into key@@.<i> slices."""
    whole = np.arange(10, dtype=np.float32).reshape(2, 5)
    saved = {"w@@.0": whole.reshape(-1)[:4], "w@@.1": whole.reshape(-1)[4:], "b": np.ones(2, np.float32),
             "UnpackBigParamInfor@@": {"w": {"OriginShape": (2, 5), "slices": ["w@@.0", "w@@.1"]}},
             "StructuredToParameterName@@": {"w": "linear_0.w_0", "b": "linear_0.b_0"}}
    path = tmp_path / "big.pdparams"
    path.write_bytes(pickle.dumps(saved, protocol=2))
    got = read_paddle(str(path))
    assert sorted(got) == ["b", "w"]
    np.testing.assert_array_equal(got["w"], whole)
    assert_same(read_paddle(str(path), to_paddle=True), paddle.load(str(path)))
    saved["UnpackBigParamInfor@@"]["w"]["OriginShape"] = (3, 5)
    path.write_bytes(pickle.dumps(saved, protocol=2))
    with pytest.raises(CheckpointError, match="do not add up"):
        read_paddle(str(path))


@pytest.mark.parametrize("protocol, numpy_module", [(2, "numpy.core"), (3, "numpy.core"), (2, "numpy._core"),
                                                    (4, "numpy._core"), (5, "numpy._core")])
def test_plain_pickles_of_numpy_arrays_as_passl_writes_them(tmp_path, protocol, numpy_module):
    """PASSL v1.1 pickles numpy weights itself; numpy 1.x writes numpy.core, 2.x numpy._core."""
    obj = {"epoch": 300, "state_dict": {"backbone.w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                        "backbone.h": np.ones(2, np.float16)},
           "lr_scheduler": {"last_epoch": 299, "last_lr": np.float64(1e-5)}}
    data = pickle.dumps(obj, protocol=protocol)
    if protocol < 4:     # GLOBAL opcodes spell the module as text: write numpy 1.x's name
        data = data.replace(b"numpy._core.multiarray\n", numpy_module.encode() + b".multiarray\n")
        assert numpy_module.encode() + b".multiarray\n_reconstruct" in data
    path = tmp_path / "epoch_300.pd"
    path.write_bytes(data)
    got = read_state(str(path))
    np.testing.assert_array_equal(got["state_dict"]["backbone.w"], obj["state_dict"]["backbone.w"])
    assert got["state_dict"]["backbone.h"].dtype == np.float16
    assert got["lr_scheduler"]["last_lr"] == 1e-5 and isinstance(got["lr_scheduler"]["last_lr"], np.float64)
    assert got["state_dict"]["backbone.w"].flags.writeable


# ---------------------------------------------------------------------------------------------
# refused

def _refused(path, match, marker=None):
    with pytest.raises(CheckpointError, match=match) as err:
        read_paddle(str(path))
    assert str(path) in str(err.value)
    if marker is not None:
        assert not marker.exists()
    return str(err.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_top_level_payload_is_refused(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    _refused(path, "refuses posix.system", marker)


def test_payload_nested_in_a_paddle_save_state_dict_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pdckpt")
    paddle.save({"model": {"w": paddle.ones([2]), "evil": Payload(marker)}, "epoch": 1}, path)
    _refused(path, "refuses posix.system", marker)


def test_eval_is_only_read_in_paddles_own_shape(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pdckpt"
    path.write_bytes(pickle.dumps({"w": EvalPayload(marker)}, protocol=4))
    message = _refused(path, "refuses builtins.eval", marker)
    assert "__import__" in message         # says what it met


class _OddTuple:
    def __reduce__(self):
        return (tuple, ([1, 2, 3],))


@pytest.mark.parametrize("payload, match", [
    (_OddTuple(), "refuses builtins.tuple"),
    (np.array([1, "a"], dtype=object), "refuses numpy dtype 'O8'"),
    (np.zeros(2, dtype=[("a", "f4")]), "refuses numpy dtype 'V4'"),
    (np.datetime64("2020-01-01"), "refuses numpy dtype 'M8'"),
    (np.ma.masked_array([1.0]), "refuses numpy.ma.core._mareconstruct"),
    (bytearray(b"x"), "refuses builtins.bytearray"),
])
def test_anything_but_data_is_refused(tmp_path, payload, match):
    path = tmp_path / "odd.pdparams"
    path.write_bytes(pickle.dumps({"x": payload}, protocol=2))
    _refused(path, match)


def test_malformed_generator_state_and_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "rng.pdckpt"
    # GeneratorState() then BUILD with (1, 2, 3, [0]): character 0 is no part of a state text
    path.write_bytes(b"\x80\x02cpaddle.base.libpaddle\nGeneratorState\n)\x81(K\x01K\x02K\x03]q\x00K\x00atb.")
    _refused(path, "refuses a GeneratorState")
    path.write_bytes(b"\x80\x02X\x03\x00\x00\x00keyQ.")                 # BINPERSID
    _refused(path, "refuses a persistent reference")


def test_truncated_and_absurd_files(tmp_path):
    path = str(tmp_path / "a.pdparams")
    paddle.save(_layer().state_dict(), path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pdparams"
    cut.write_bytes(data[: len(data) // 2])
    _refused(cut, "cannot be read")
    deep = tmp_path / "deep.pdparams"
    deep.write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")   # lists nested 100000 deep
    _refused(deep, "nested too deeply")
