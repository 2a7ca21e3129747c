"""Read and write PyTorch ``.pth`` files without PyTorch.

Since torch 1.6 a ``.pth`` file is a zip archive::

    <prefix>/data.pkl       pickle of the object; every tensor is a call of
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                            whose storage is a persistent id ('storage', torch.FloatStorage, key, location, numel)
    <prefix>/data/<key>     the raw bytes of each storage (little-endian unless <prefix>/byteorder says big)
    <prefix>/version        format version

Older files (torch < 1.6) are a sequence of pickles followed by the raw storages; ``load_pth``
reads those too. Tensors come back as numpy arrays (bfloat16 is widened to float32, numpy has no
bfloat16); containers, numbers and strings come back as they were. Unknown classes in checkpoint
metadata (e.g. a training script's own argument object) are never imported or executed: they come
back as inert ``UnknownObject`` records, so reading a file cannot run code from it.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from passl.errors import CheckpointError
from passl.utils.fileio import atomic_path

__all__ = ["load_pth", "save_pth", "UnknownObject"]

# torch storage class name -> numpy dtype (little-endian)
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
}
_DTYPE_STORAGES = {np.dtype(v).str if v != "bfloat16" else v: k for k, v in _STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


# ---------------------------------------------------------------------------------------------
# reading

class UnknownObject:
    """Stand-in for an instance of a class this reader does not import (checkpoint metadata).
    ``qualname`` names the class; ``args`` / ``state`` hold what the file gave to build it."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"UnknownObject({self.qualname})"


def _unknown_class(qualname):
    """A class standing for the global ``qualname``; building it records, never runs, anything."""
    return type(qualname.rsplit(".", 1)[-1], (UnknownObject,), {"qualname": qualname})


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat array of one storage, filled eagerly (zip) or after the main pickle (legacy)."""

    def __init__(self, storage_type, numel):
        self.storage_type, self.numel, self.array = storage_type, numel, None


class _PendingTensor:
    """A tensor whose storage bytes come after the main pickle (legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _bytes_to_array(raw, dtype, big_endian=False):
    if dtype == "bfloat16":  # upper 16 bits of a float32
        halves = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
        return (halves << 16).view(np.float32)
    dt = np.dtype(dtype)
    arr = np.frombuffer(raw, dtype=dt.newbyteorder(">") if big_endian and dt.itemsize > 1 else dt)
    return arr.astype(dt.newbyteorder("="), copy=False)


def _view(storage, offset, size, stride):
    """numpy array of shape ``size`` viewing ``storage`` at ``offset`` with ``stride`` (in elements)."""
    flat = storage.array
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size:
        raise CheckpointError(f"corrupt tensor: offset {offset}, size {size}, stride {stride} "
                              f"exceed a storage of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride))
    return np.array(view, copy=True)  # own the memory: storages may be shared between tensors


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if storage.array is None:
        return _PendingTensor(storage, storage_offset, size, stride)
    return _view(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def _reconstruct_numpy(module, name):
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return getattr(multiarray, name)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("_codecs", "encode"): __import__("codecs").encode,  # how protocol 2 spells bytes
    ("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages, path):
        super().__init__(file)
        self._storages, self._path = storages, path

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
            return _reconstruct_numpy(module, name)
        if module == "argparse" and name == "Namespace":
            import argparse
            return argparse.Namespace
        return _unknown_class(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r} in the pickle")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: tensors of type {storage_type.qualname} are not supported")
        return self._storages(key, storage_type, numel, pid[5] if len(pid) > 5 else None)


def load_pth(path):
    """Read a PyTorch ``.pth`` / ``.pth.tar`` file without torch.

    Returns the saved object with every tensor replaced by a numpy array of the same dtype
    (bfloat16 -> float32), shape and values (strides and storage offsets honoured), e.g. a
    state dict ``{name: ndarray}`` or a checkpoint ``{"state_dict": {...}, "epoch": 300}``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return _load_legacy(path)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: this is the tar-based format of torch < 0.4, which is not supported; "
                              "re-save it with torch>=1.6 (torch.save(torch.load(f), g))")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")


def _load_zip(path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path}: a zip file without <dir>/data.pkl is not a PyTorch checkpoint")
        prefix = pkl[0][:-len("data.pkl")]
        big = False
        if prefix + "byteorder" in names:
            big = zf.read(prefix + "byteorder").decode().strip() == "big"
        cache = {}

        def storage(key, storage_type, numel, view_metadata):
            if key not in cache:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointError(f"{path}: missing storage record {record}")
                st = _Storage(storage_type, numel)
                st.array = _bytes_to_array(zf.read(record), storage_type.dtype, big)
                cache[key] = st
            return cache[key]

        with zf.open(pkl[0]) as f:
            return _Unpickler(io.BytesIO(f.read()), storage, path).load()


def _load_legacy(path):
    """torch < 1.6 format: magic, protocol, sys_info, the object, storage keys, then raw storages."""
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: a pickle but not a PyTorch checkpoint; if it was written by "
                                  "torch, re-save it with torch>=1.6 (torch.save(torch.load(f), g))")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported; "
                                  "re-save it with torch>=1.6")
        storages, views = {}, []

        def storage(key, storage_type, numel, view_metadata):
            if key not in storages:
                storages[key] = _Storage(storage_type, numel)
            if view_metadata is not None:  # a slice of a bigger storage
                view_key, offset, view_size = view_metadata
                view = _Storage(storage_type, view_size)
                views.append((view, storages[key], offset))
                return view
            return storages[key]

        obj = _Unpickler(f, storage, path).load()
        keys = pickle.load(f)
        for key in keys:
            st = storages[str(key)]
            itemsize = 2 if st.storage_type.dtype == "bfloat16" else np.dtype(st.storage_type.dtype).itemsize
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * itemsize)
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"{path}: truncated file (storage {key})")
            st.array = _bytes_to_array(raw, st.storage_type.dtype)
        for view, base, offset in views:
            view.array = base.array[offset:offset + view.numel]
    return _resolve(obj)


def _resolve(obj):
    """Replace _PendingTensor leaves with arrays once the legacy storages have been read."""
    if isinstance(obj, _PendingTensor):
        return _view(obj.storage, obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve(obj[k])
        return obj
    if isinstance(obj, list):
        obj[:] = [_resolve(v) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return type(obj)(*[_resolve(v) for v in obj]) if hasattr(obj, "_fields") else tuple(_resolve(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# writing

class _Global:
    """Pickled as a bare GLOBAL opcode ``module.name`` (no import needed to write it)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists that the function is callable
        raise TypeError("marker only")


class _StorageRef:
    """One array's storage: pickled as the persistent id torch expects, its bytes go to data/<key>."""

    def __init__(self, array, key):
        self.array, self.key = array, key


class _TensorRef:
    """An array pickled as ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, {})``."""

    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        shape = tuple(int(n) for n in self.storage.array.shape)
        stride, acc = [], 1
        for n in reversed(shape):
            stride.insert(0, acc)
            acc *= max(n, 1)
        return (_REBUILD, (self.storage, 0, shape, tuple(stride), False, collections.OrderedDict()))


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _Pickler(pickle._Pickler):  # the pure-python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self._storage_types = {}

    def save_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = save_marker

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        name = _DTYPE_STORAGES[obj.array.dtype.str]
        storage_type = self._storage_types.setdefault(name, _Global("torch", name))
        return ("storage", storage_type, obj.key, "cpu", int(obj.array.size))


def _prepare(obj, arrays, memo):
    """Copy ``obj`` replacing numpy arrays with _TensorRef (one storage per distinct array)."""
    if isinstance(obj, np.ndarray):
        if id(obj) not in memo:
            arr = obj if obj.flags.c_contiguous else np.array(obj, order="C")  # ascontiguousarray makes 0-d 1-d
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            if arr.dtype.str not in _DTYPE_STORAGES:
                raise TypeError(f"save_pth: numpy dtype {arr.dtype} has no torch storage type")
            storage = _StorageRef(arr, str(len(arrays)))
            arrays.append(storage)
            memo[id(obj)] = (_TensorRef(storage), obj)  # keep obj alive so its id stays unique
        return memo[id(obj)][0]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "numpy") and callable(obj.numpy) and hasattr(obj, "shape"):  # paddle / torch tensor
        return _prepare(np.asarray(obj.numpy()), arrays, memo)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _prepare(v, arrays, memo)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _prepare(v, arrays, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_prepare(v, arrays, memo) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_prepare(v, arrays, memo) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    raise TypeError(f"save_pth: cannot write a {type(obj).__name__}; use dicts, lists, tuples, numbers, "
                    "strings and numpy arrays")


def _write_record(zf, name, data):
    """Store ``data`` uncompressed with its bytes 64-byte aligned in the file, as torch does
    (torch can then memory-map the storages)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4
    pad = -header_end % 64
    info.extra = struct.pack("<HH", 0x4650, pad) + b"Z" * pad  # 'FP' padding field, like torch's writer
    zf.writestr(info, data)


def save_pth(obj, path):
    """Write ``obj`` (nested dicts / lists / tuples of numpy arrays, numbers, strings) as a PyTorch
    zip-format ``.pth`` that ``torch.load`` reads (arrays become CPU tensors of the same dtype and
    shape). numpy scalars become Python numbers; paddle tensors are written as arrays. The file is
    written to a temporary name and renamed, so a crash never leaves half a file."""
    path = os.fspath(path)
    arrays = []
    prepared = _prepare(obj, arrays, {})
    buf = io.BytesIO()
    _Pickler(buf).dump(prepared)
    prefix = "archive"
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            _write_record(zf, f"{prefix}/data.pkl", buf.getvalue())
            _write_record(zf, f"{prefix}/byteorder", b"little")
            for storage in arrays:
                _write_record(zf, f"{prefix}/data/{storage.key}", storage.array.tobytes())
            _write_record(zf, f"{prefix}/version", b"3\n")
    return path
