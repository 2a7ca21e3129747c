"""passl.io.pth: torch-free reading and writing of PyTorch .pth files.

The two files in tests/io/data were written by real torch 2.13 (torch.save, zip and legacy
format) from arange-based tensors, so the expected values below are derived independently.
"""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from crafted import LEGACY_POSITIONS, Payload, Storage, Tensor, contiguous, dumps, write_legacy, write_zip
from passl.errors import CheckpointError
from passl.io.pth import load_pth, save_pth

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


def test_argparse_namespace_in_metadata_is_data(tmp_path):
    """Training scripts store their arguments; they come back as a Namespace of plain values."""
    import argparse
    path = tmp_path / "args.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"args": argparse.Namespace(lr=0.1, model="lvvit_s")}, protocol=2))
    assert vars(load_pth(path)["args"]) == {"lr": 0.1, "model": "lvvit_s"}


@pytest.mark.parametrize("nested", [False, True], ids=["top_level", "inside_state_dict"])
def test_zip_pickle_that_runs_code_is_refused(tmp_path, nested):
    marker = tmp_path / "ran"
    obj = {"state_dict": {"w": contiguous("0", np.ones(3, np.float32)), "evil": Payload(marker)}} if nested \
        else Payload(marker)
    path = write_zip(tmp_path / "evil.pth", obj)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refuses posix\.system"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("position", LEGACY_POSITIONS)
def test_legacy_pickle_that_runs_code_is_refused_at_every_position(tmp_path, position):
    marker = tmp_path / "ran"
    obj = {"w": contiguous("0", np.arange(4, dtype=np.float32))}
    good = write_legacy(tmp_path / "good.pth", obj)
    np.testing.assert_array_equal(load_pth(good)["w"], np.arange(4))    # the crafted layout itself reads
    path = write_legacy(tmp_path / "evil.pth", obj, replace={position: pickle.dumps(Payload(marker), protocol=2)})
    with pytest.raises(CheckpointError, match=r"evil\.pth: refuses posix\.system"):
        load_pth(path)
    assert not marker.exists()


def test_tensor_subclasses_and_unknown_storages_are_refused(tmp_path):
    path = tmp_path / "q.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R.")
    with pytest.raises(CheckpointError, match="refuses torch._utils._rebuild_qtensor"):
        load_pth(path)


def _one_tensor(tmp_path, offset, size, stride, numel=6, name="bad.pth"):
    storage = Storage("0", np.arange(numel, dtype=np.float32))
    return write_zip(tmp_path / name, {"blocks.0.w": Tensor(storage, offset, size, stride)})


@pytest.mark.parametrize("offset, size, stride, what", [
    (0, (2, 3), (3, -1), "strides must be positive"),           # read memory before the storage
    (5, (3,), (-2,), "strides must be positive"),
    (0, (2, 3), (0, 1), "strides must be positive"),             # a zero stride repeats memory
    (0, (2, 3), (3, 2), "reach element"),                         # last element 7 of a storage of 6
    (4, (3,), (1,), "reach element"),
    (7, (1,), (1,), "outside its storage"),
    (-1, (2,), (1,), "outside its storage"),
    (0, (2, 2 ** 62), (2 ** 62, 1), "reach element"),             # would overflow int64 byte offsets
    (0, (-2, 3), (3, 1), "negative size"),
])
def test_views_outside_their_storage_are_errors_naming_file_and_tensor(tmp_path, offset, size, stride, what):
    path = _one_tensor(tmp_path, offset, size, stride)
    with pytest.raises(CheckpointError, match=what) as err:
        load_pth(path)
    assert "bad.pth" in str(err.value) and "blocks.0.w" in str(err.value)


def test_legal_views_are_exact(tmp_path):
    base = np.arange(12, dtype=np.float32)
    storage = Storage("0", base)
    obj = {"t": Tensor(storage, 0, (3, 4), (1, 3)), "s": Tensor(storage, 5, (2, 2), (4, 1)),
           "one": Tensor(storage, 11, (1, 1), (0, 0)), "empty": Tensor(storage, 12, (0, 5), (5, 1))}
    got = load_pth(write_zip(tmp_path / "v.pth", obj))
    np.testing.assert_array_equal(got["t"], base.reshape(4, 3).T)
    np.testing.assert_array_equal(got["s"], [[5, 6], [9, 10]])
    assert got["one"].tolist() == [[11.0]] and got["empty"].shape == (0, 5)
    got["t"][0, 0] = 100.0                                   # views of one storage are independent copies
    assert got["s"][0, 0] == 5.0


def test_a_tensor_that_is_its_storage_is_not_copied(tmp_path):
    shared = Storage("1", np.ones(4, np.float32))
    obj = {"alone": contiguous("0", np.arange(6, dtype=np.float32).reshape(2, 3)),
           "a": Tensor(shared, 0, (4,), (1,)), "b": Tensor(shared, 0, (2, 2), (2, 1))}
    got = load_pth(write_zip(tmp_path / "c.pth", obj))
    assert got["alone"].base is not None and got["alone"].flags.writeable       # a view of the storage array
    got["a"][0] = 7.0
    assert got["b"][0, 0] == 1.0                              # a shared storage is copied per tensor


def test_storage_size_must_match_its_record(tmp_path):
    storage = Storage("0", np.arange(6, dtype=np.float32))
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps({"w": Tensor(storage, 0, (6,), (1,))}))
        zf.writestr("archive/data/0", storage.array[:4].tobytes())
    with pytest.raises(CheckpointError, match="storage 0 holds 16 bytes"):
        load_pth(path)
    legacy = write_legacy(tmp_path / "cut.pth", {"w": Tensor(storage, 0, (6,), (1,))})
    with open(legacy, "r+b") as f:
        f.truncate(os.path.getsize(legacy) - 8)
    with pytest.raises(CheckpointError, match="truncated"):
        load_pth(legacy)


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
