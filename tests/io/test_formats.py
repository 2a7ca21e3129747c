"""passl.io: the format table. Content decides the format and must agree with the suffix; every
format we write reads back (ours and, where it exists, the format's own reader)."""
import json
import pickle
import struct

import numpy as np
import paddle
import pytest

from crafted import contiguous, write_zip
from passl.errors import CheckpointError
from passl.io import (format_of, load_pth, read_safetensors, read_state, safetensors_metadata, write_safetensors,
                      write_weights)

WEIGHTS = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.array([0.5, -1.0], np.float16),
           "count": np.array(3, np.int64), "flag": np.array([True, False])}


def _assert_weights(got, expected=WEIGHTS):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("suffix", [".pdparams", ".safetensors", ".pth"])
def test_every_weights_format_we_write_reads_back(tmp_path, suffix):
    path = str(tmp_path / f"w{suffix}")
    write_weights(WEIGHTS, path, metadata={"variant": "lvvit_t", "img_size": 224})
    _assert_weights(read_state(path))
    assert [p.name for p in tmp_path.iterdir()] == [f"w{suffix}"]           # written whole, no temporary left
    if suffix == ".pdparams":      # Paddle's own reader agrees
        loaded = paddle.load(path)
        np.testing.assert_array_equal(loaded["a.weight"].numpy(), WEIGHTS["a.weight"])
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        _assert_weights(load_file(path))
        assert safetensors_metadata(path) == {"variant": "lvvit_t", "img_size": "224"}


def test_paddle_tensors_are_written_as_arrays(tmp_path):
    path = str(tmp_path / "t.safetensors")
    write_weights({"w": paddle.arange(4, dtype="float32")}, path)
    assert read_state(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_content_decides_when_the_suffix_says_nothing(tmp_path):
    sources = {"zip": write_zip(tmp_path / "z.pth", {"w": contiguous("0", np.ones(2, np.float32))}),
               "st": write_safetensors({"w": np.ones(2, np.float32)}, str(tmp_path / "s.safetensors")),
               "pd": str(tmp_path / "p.pdparams"), "npy": str(tmp_path / "n.npy")}
    paddle.save({"w": paddle.ones([2])}, sources["pd"])
    np.save(sources["npy"], np.ones(2, np.float32))
    for name, path in sources.items():
        renamed = tmp_path / f"{name}.bin.weights"
        renamed.write_bytes(open(path, "rb").read())
        got = read_state(str(renamed))
        np.testing.assert_array_equal(got if name == "npy" else got["w"], [1.0, 1.0])


@pytest.mark.parametrize("writer, named, says", [
    ("zip", "x.pdparams", "named like a Paddle pickle .* but holds a PyTorch checkpoint; rename it to end in .pth"),
    ("pickle", "x.safetensors", "named like a safetensors file but holds a Paddle pickle"),
    ("safetensors", "x.pth", "named like a PyTorch checkpoint but holds a safetensors file"),
    ("pickle", "x.npy", "named like a numpy .npy array but holds a Paddle pickle"),
    ("pickle", "x.pth", "a pickle but not a PyTorch checkpoint; if it was written by torch < 1.6"),
    ("text", "x.pdckpt", "cannot be read"),
    ("text", "x.safetensors", "not a valid .safetensors file"),
    ("text", "x.weights", "not a weights or checkpoint file this project reads"),
])
def test_a_file_that_is_not_what_its_name_says_is_an_error(tmp_path, writer, named, says):
    path = tmp_path / named
    if writer == "zip":
        write_zip(path, {"w": contiguous("0", np.ones(2, np.float32))})
    elif writer == "pickle":
        path.write_bytes(pickle.dumps({"w": np.ones(2)}, protocol=4))
    elif writer == "safetensors":
        write_safetensors({"w": np.ones(2, np.float32)}, str(path))
    else:
        path.write_text("hello, not weights")
    with pytest.raises(CheckpointError, match=says) as err:
        read_state(str(path))
    assert str(path) in str(err.value)


def test_missing_file_and_unwritable_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        format_of(tmp_path / "none.pdparams")
    with pytest.raises(CheckpointError, match="written as .pdparams, .safetensors or .pth"):
        write_weights(WEIGHTS, tmp_path / "w.npy")


def test_safetensors_bfloat16_is_widened_and_bad_headers_are_named(tmp_path):
    header = json.dumps({"b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "bf.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array([0x3FC0, 0xC000], "<u2").tobytes())
    got = read_safetensors(str(path))["b"]
    assert got.dtype == np.float32 and got.tolist() == [1.5, -2.0]
    header = json.dumps({"b": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)       # ranges beyond the file
    with pytest.raises(CheckpointError, match="bf.safetensors: not a valid .safetensors file"):
        read_safetensors(str(path))


def test_npy_holding_objects_is_refused(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="o.npy: not a readable .npy array of numbers"):
        read_state(str(path))


def test_pytorch_files_still_read_through_the_table(tmp_path):
    path = write_zip(tmp_path / "t.pth.tar", {"state_dict": {"w": contiguous("0", np.arange(3, dtype=np.float32))}})
    assert format_of(path).name == "pytorch"
    np.testing.assert_array_equal(load_pth(path)["state_dict"]["w"], [0, 1, 2])
