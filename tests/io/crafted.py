"""Crafted files for the reader tests, written independently of passl.io: PyTorch zip and legacy
files from a small pickler of their own, and payloads that create a marker file when unpickled by
anything that runs code (``pickle.load``, ``paddle.load``, ``torch.load(weights_only=False)``); and
``assert_same``, a deep comparison used with ``paddle.load`` as the oracle."""
import collections
import io
import os
import pickle
import shlex
import struct
import zipfile

import numpy as np
import paddle

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
STORAGE_NAMES = {"<f4": "FloatStorage", "<f2": "HalfStorage", "<f8": "DoubleStorage", "<i8": "LongStorage",
                 "|u1": "ByteStorage", "|b1": "BoolStorage", "<i4": "IntStorage"}


class Payload:
    """Unpickled by a reader that runs code, this creates ``marker`` (through ``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class EvalPayload:
    """Paddle's own call shape, ``eval(source, globals)``, with a source that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).touch()", {"data": np.zeros(1)}))


class _Global:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("marker only")


class Storage:
    """A torch storage: its key and flat array."""

    def __init__(self, key, array):
        self.key, self.array = str(key), np.ascontiguousarray(array).reshape(-1)


class Tensor:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def contiguous(key, array):
    """A Tensor covering all of a new storage holding ``array``."""
    array = np.ascontiguousarray(array)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(key, array), 0, array.shape, strides)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", _Global("torch", STORAGE_NAMES[obj.array.dtype.str]), obj.key, "cpu", obj.array.size)
        return pid + (None,) if self.legacy else pid


def dumps(obj, legacy=False):
    buf = io.BytesIO()
    _Pickler(buf, legacy).dump(obj)
    return buf.getvalue()


def storages_of(obj, found=None):
    found = {} if found is None else found
    if isinstance(obj, Tensor):
        found[obj.storage.key] = obj.storage
    elif isinstance(obj, dict):
        for v in obj.values():
            storages_of(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            storages_of(v, found)
    return found


def write_zip(path, obj, data_pkl=None):
    """A torch >= 1.6 zip file holding ``obj`` (or the raw pickle ``data_pkl``)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps(obj) if data_pkl is None else data_pkl)
        for key, storage in storages_of(obj).items():
            zf.writestr(f"archive/data/{key}", storage.array.tobytes())
        zf.writestr("archive/version", "3\n")
    return str(path)


LEGACY_POSITIONS = ("magic", "protocol", "sys_info", "object", "storage_keys")


def write_legacy(path, obj, replace=None):
    """A torch < 1.6 file: five pickles then the raw storages; ``replace`` {position: pickle bytes}."""
    storages = storages_of(obj)
    pickles = {"magic": pickle.dumps(LEGACY_MAGIC, protocol=2), "protocol": pickle.dumps(1001, protocol=2),
               "sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
               "object": dumps(obj, legacy=True), "storage_keys": pickle.dumps(sorted(storages), protocol=2)}
    pickles.update(replace or {})
    with open(path, "wb") as f:
        for position in LEGACY_POSITIONS:
            f.write(pickles[position])
        for key in sorted(storages):
            array = storages[key].array
            f.write(struct.pack("<q", array.size) + array.tobytes())
    return str(path)


def object_npy(path, marker):
    """A .npy file holding an object array whose element is a Payload (np.save pickles it)."""
    array = np.empty(1, dtype=object)
    array[0] = Payload(marker)
    np.save(path, array, allow_pickle=True)
    return str(path)


def assert_same(a, b, where="top"):
    """Equal structure, types, dtypes and values (paddle Tensors, numpy arrays, GeneratorStates)."""
    if isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, paddle.Tensor):
        assert isinstance(b, paddle.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=where)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif type(a).__name__ == "GeneratorState":
        assert type(b).__name__ == "GeneratorState" and a.__getstate__() == b.__getstate__(), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)
