"""passl.utils.pth_io: torch-free reading and writing of PyTorch .pth files.

The two files in tests/models/data were written by real torch 2.13 (torch.save, zip and legacy
format) from arange-based tensors, so the expected values below are derived independently.
"""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from passl.errors import CheckpointError
from passl.utils.pth_io import UnknownObject, load_pth, save_pth

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_round_trip_dtypes_and_nesting(tmp_path):
    rng = np.random.default_rng(0)
    obj = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 5, 7, 7)).astype(np.float16),
        "i64": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
        "nested": {"list": [np.ones(2, np.int32), (1.5, "text", None)],
                   "od": collections.OrderedDict(b=np.array([True, False]), u8=np.arange(4, dtype=np.uint8))},
        "scalar0d": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "epoch": 12, "np_number": np.float32(0.25),
    }
    obj["fortran"] = np.asfortranarray(obj["f32"])
    path = save_pth(obj, tmp_path / "x.pth")
    back = load_pth(path)
    for key in ("f32", "f16", "i64", "scalar0d", "empty", "fortran"):
        assert back[key].dtype == obj[key].dtype and back[key].shape == obj[key].shape
        np.testing.assert_array_equal(back[key], obj[key])
    np.testing.assert_array_equal(back["nested"]["list"][0], np.ones(2, np.int32))
    assert back["nested"]["list"][1] == (1.5, "text", None)
    assert isinstance(back["nested"]["od"], collections.OrderedDict)
    np.testing.assert_array_equal(back["nested"]["od"]["b"], [True, False])
    assert back["epoch"] == 12 and back["np_number"] == 0.25 and type(back["np_number"]) is float


def test_written_file_has_torch_layout(tmp_path):
    """The zip layout torch.load expects: <dir>/data.pkl, <dir>/data/<key>, <dir>/version;
    storages 64-byte aligned; the pickle names torch globals without torch being importable."""
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = save_pth({"a": arr}, tmp_path / "y.pth")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert {"archive/data.pkl", "archive/version", "archive/data/0"} <= set(names)
        info = zf.getinfo("archive/data/0")
        assert zf.read("archive/data/0") == arr.astype("<f2").tobytes()
        data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        assert data_start % 64 == 0
        pkl = zf.read("archive/data.pkl")
    assert b"torch._utils\n_rebuild_tensor_v2\n" in pkl and b"torch\nHalfStorage\n" in pkl


def test_shared_array_is_one_storage(tmp_path):
    arr = np.ones((2, 2), np.float32)
    path = save_pth({"a": arr, "b": arr}, tmp_path / "s.pth")
    with zipfile.ZipFile(path) as zf:
        assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]


@pytest.mark.parametrize("name", ["torch_made.pth", "torch_made_legacy.pth"])
def test_reads_files_written_by_torch(name):
    got = load_pth(os.path.join(DATA, name))
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(got["transposed"], base.T)       # stride (1, 6)
    np.testing.assert_array_equal(got["slice"], base[1:3, 2:5])     # storage offset 8
    assert got["half"].dtype == np.float16
    np.testing.assert_array_equal(got["half"], (np.arange(6).reshape(2, 3) / 4).astype(np.float16))
    assert got["long"].dtype == np.int64 and got["long"].tolist() == [0, 1, 2, 3, 4]
    assert got["bf16"].dtype == np.float32 and got["bf16"].tolist() == [1.5, -2.0]
    np.testing.assert_array_equal(got["param"], np.full((2, 2), 0.25, np.float32))
    assert got["meta"] == {"epoch": 7, "arch": "lvvit_s"}
    assert got["od"]["a"].tolist() == [True, False]


def test_unknown_classes_are_inert(tmp_path):
    """A class in checkpoint metadata is recorded, never imported or run."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run > " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil(), "y": 1}, protocol=2))
        zf.writestr("archive/version", "3\n")
    got = load_pth(path)
    assert isinstance(got["x"], UnknownObject) and got["y"] == 1
    assert got["x"].qualname.endswith("system")
    assert not (tmp_path / "ran").exists()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pth(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_pth(junk)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="torch>=1.6"):
        load_pth(plain)


def test_torch_reads_our_file_if_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed; torch-free tests above cover the format")
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    path = save_pth({"a": arr, "n": [np.arange(3)]}, tmp_path / "t.pth")
    got = torch.load(path, weights_only=True)
    assert got["a"].dtype == torch.float16 and got["a"].numpy().tolist() == arr.tolist()
    assert got["n"][0].tolist() == [0, 1, 2]


def test_numpy_objects_in_metadata(tmp_path):
    """Training scripts store numpy scalars (e.g. the best metric) next to the weights."""
    path = tmp_path / "meta.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"metric": np.float64(83.3), "arr": np.arange(3),
                                                      "raw": b"\x00\x01"}, protocol=2))
    got = load_pth(path)
    assert got["metric"] == 83.3 and got["arr"].tolist() == [0, 1, 2] and got["raw"] == b"\x00\x01"
