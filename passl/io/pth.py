"""PyTorch ``.pth`` / ``.pth.tar`` files, read and written without PyTorch.

Since torch 1.6 a ``.pth`` file is a zip archive::

    <prefix>/data.pkl       pickle of the object; every tensor is a call of
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                            whose storage is a persistent id ('storage', torch.FloatStorage, key, location, numel)
    <prefix>/data/<key>     the raw bytes of each storage (little-endian unless <prefix>/byteorder says big)
    <prefix>/version        format version

Older files (torch < 1.6) are five pickles (magic number, protocol, system info, the object, the
storage keys) followed by the raw storages. Every one of those pickles goes through the restricted
unpickler (passl.io.unpickle), which admits containers, numbers, strings, numpy arrays and scalars,
the tensor-rebuild calls below, torch dtypes and storage types, ``torch.Size`` and
``argparse.Namespace`` (training scripts store their arguments), and refuses anything else.

Tensors come back as numpy arrays of the same dtype (bfloat16 widened to float32), shape and values.
Each view is checked against its storage: a negative, zero or overflowing stride, or an offset or size
reaching outside the storage is an error naming the file and the tensor. A tensor that is the whole
of a storage no other tensor uses is returned without a copy.
"""
import collections
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

from passl.errors import CheckpointError
from passl.io.unpickle import (CONTAINER_GLOBALS, NUMPY_GLOBALS, Placeholder, refuse, resolve_placeholders,
                               restricted_load)
from passl.utils.fileio import atomic_path

__all__ = ["load_pth", "save_pth", "is_torch_legacy", "is_zip", "LEGACY_MAGIC"]

# torch storage class name -> numpy dtype (little-endian); bfloat16 is widened to float32 on reading
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
    "UntypedStorage": "u1",
}
_TORCH_DTYPES = {"float64": "<f8", "double": "<f8", "float32": "<f4", "float": "<f4", "float16": "<f2",
                 "half": "<f2", "bfloat16": "bfloat16", "int64": "<i8", "long": "<i8", "int32": "<i4",
                 "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
                 "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16"}
_DTYPE_STORAGES = {np.dtype(v).str if v != "bfloat16" else v: k for k, v in _STORAGE_DTYPES.items()
                   if k != "UntypedStorage"}
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
# the first pickle of a legacy file: protocol 2, LONG1 of 10 bytes holding the magic number, STOP
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little") + b"."


def _itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# reading: what the pickle may build

class _StorageType:
    """``torch.FloatStorage`` and friends: only usable inside a persistent id."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _TorchDType:
    """``torch.float32`` and friends: only usable as the dtype argument of _rebuild_tensor_v3."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, _TORCH_DTYPES[name]


class _Marker:
    """``torch.Tensor`` / ``torch.nn.Parameter``: only usable as _rebuild_from_type_v2's new_type."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Storage:
    """One storage: its flat array (filled while unpickling for zip files, after the object for legacy
    files) and how many tensors view it (a tensor may take the array itself only when alone)."""

    __slots__ = ("dtype", "numel", "array", "users", "key")

    def __init__(self, dtype, numel, key):
        self.dtype, self.numel, self.key, self.array, self.users = dtype, numel, key, None, 0


class _Tensor(Placeholder):
    """A tensor view of a storage, turned into an array once every storage has been read."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype", "path")

    def __init__(self, storage, offset, size, stride, path, dtype=None):
        self.storage, self.offset, self.size, self.stride, self.path = storage, offset, size, stride, path
        self.dtype = dtype
        storage.users += 1

    def resolve(self, where):
        return _view(self, where or "top level")


class _Namespace(Placeholder):
    """``argparse.Namespace`` (a training script's arguments): its attributes as a Namespace."""

    __slots__ = ("state",)

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError("corrupt argparse.Namespace")
        self.state = state

    def resolve(self, where):
        import argparse
        return argparse.Namespace(**getattr(self, "state", {}))


def _ints(values):
    return isinstance(values, tuple) and all(type(v) is int for v in values)


def _torch_globals(path):
    def rebuild(storage, storage_offset, size, stride, *rest, dtype=None):
        if not isinstance(storage, _Storage) or type(storage_offset) is not int or not _ints(size) \
                or not _ints(stride) or len(size) != len(stride):
            raise CheckpointError(f"{path}: corrupt tensor record (storage offset {storage_offset!r}, "
                                  f"size {size!r}, stride {stride!r})")
        return _Tensor(storage, storage_offset, size, stride, path, dtype)

    def rebuild_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *rest):
        if not isinstance(dtype, _TorchDType):
            raise CheckpointError(f"{path}: corrupt tensor record (dtype {dtype!r})")
        if isinstance(storage, _Storage) and storage.dtype not in (dtype.dtype, "u1"):
            raise CheckpointError(f"{path}: tensor of {dtype.name} on a storage of {storage.dtype}")
        return rebuild(storage, storage_offset, size, stride, dtype=dtype.dtype)

    def parameter(data, *rest):
        if not isinstance(data, _Tensor):
            raise CheckpointError(f"{path}: corrupt parameter record")
        return data

    def from_type(func, new_type, args, state=None):
        if func not in (rebuild, rebuild_v3, parameter) or not isinstance(new_type, _Marker) \
                or not isinstance(args, tuple):
            raise refuse(path, "a tensor subclass rebuild", "only plain tensors and parameters are read")
        return func(*args)

    def size(dims=()):
        if not _ints(tuple(dims)):
            raise CheckpointError(f"{path}: corrupt torch.Size")
        return tuple(dims)

    table = {**NUMPY_GLOBALS(path), **CONTAINER_GLOBALS(path),
             ("torch._utils", "_rebuild_tensor_v2"): rebuild, ("torch._utils", "_rebuild_tensor"): rebuild,
             ("torch._utils", "_rebuild_tensor_v3"): rebuild_v3,
             ("torch._utils", "_rebuild_parameter"): parameter,
             ("torch._utils", "_rebuild_parameter_with_state"): parameter,
             ("torch._tensor", "_rebuild_from_type_v2"): from_type,
             ("torch", "Tensor"): _Marker("torch.Tensor"), ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
             ("torch", "Size"): size, ("argparse", "Namespace"): _Namespace}
    table.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
    table.update({("torch", name): _TorchDType(name) for name in _TORCH_DTYPES})
    return table


def _storage_pid(pid, path):
    """(storage type, key, numel, view metadata) of a persistent id, checked."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise refuse(path, f"the persistent reference {str(pid)[:80]!r}", "only tensor storages are read")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
        raise refuse(path, f"a storage of type {storage_type!r}", "only numeric storages are read")
    if type(numel) is not int or numel < 0:
        raise CheckpointError(f"{path}: corrupt storage {key}: {numel!r} elements")
    return storage_type, key, numel, (pid[5] if len(pid) > 5 else None)


def _view(tensor, where):
    """The array of ``tensor``: every index checked to fall inside its storage."""
    storage, offset, size, stride = tensor.storage, tensor.offset, tensor.size, tensor.stride
    name = f"{tensor.path}: tensor '{where}'"
    if storage.array is None:
        raise CheckpointError(f"{name}: its storage {storage.key} has no data in the file")
    flat = storage.array
    if tensor.dtype is not None and tensor.dtype != storage.dtype:   # v3 tensor on an untyped storage
        if flat.nbytes % _itemsize(tensor.dtype):
            raise CheckpointError(f"{name}: cannot view {storage.dtype} storage as {tensor.dtype}")
        flat = ((flat.view("<u2").astype(np.uint32) << 16).view(np.float32) if tensor.dtype == "bfloat16"
                else flat.view(np.dtype(tensor.dtype)))
    if any(n < 0 for n in size):
        raise CheckpointError(f"{name}: negative size {list(size)}")
    if offset < 0 or offset > flat.size:
        raise CheckpointError(f"{name}: storage offset {offset} outside its storage of {flat.size} elements")
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        return np.zeros(size, dtype=flat.dtype)
    for n, s in zip(size, stride):
        if s < 0 or (n > 1 and s == 0):
            raise CheckpointError(f"{name}: stride {list(stride)} for size {list(size)}: strides must be "
                                  "positive; the file is corrupt or crafted")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))   # Python ints: no overflow
    if last >= flat.size:
        raise CheckpointError(f"{name}: offset {offset}, size {list(size)}, stride {list(stride)} reach element "
                              f"{last} of a storage of {flat.size}; the file is corrupt or crafted")
    contiguous, expected = True, 1
    for n, s in zip(reversed(size), reversed(stride)):
        contiguous &= n == 1 or s == expected
        expected *= n
    if contiguous and offset == 0 and numel == flat.size and storage.users == 1:
        return flat.reshape(size)          # the tensor is its storage: no copy
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride))
    return np.array(view, copy=True)       # own the memory: a storage may be shared


def _read_storage(stream, storage_dtype, numel, big_endian=False):
    """``numel`` items of ``storage_dtype`` read from ``stream`` into a new writeable array."""
    if storage_dtype == "bfloat16":        # the upper 16 bits of a float32
        halves = np.empty(numel, dtype=">u2" if big_endian else "<u2")
        _readinto(stream, halves)
        return (halves.astype(np.uint32) << 16).view(np.float32)
    dtype = np.dtype(storage_dtype)
    array = np.empty(numel, dtype=dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype)
    _readinto(stream, array)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _readinto(stream, array):
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        count = stream.readinto(view[done:])
        if not count:
            raise EOFError(f"{len(view) - done} bytes missing")
        done += count


# ---------------------------------------------------------------------------------------------
# reading: the two layouts

def is_torch_legacy(head):
    """True when ``head`` (the first bytes of a file) starts with the legacy torch magic pickle."""
    return head.startswith(_LEGACY_HEAD)


def load_pth(path):
    """Read a PyTorch ``.pth`` / ``.pth.tar`` file without torch and without running code from it.

    Returns the saved object with every tensor replaced by a numpy array of the same dtype
    (bfloat16 -> float32), shape and values (strides and storage offsets honoured), e.g. a
    state dict ``{name: ndarray}`` or a checkpoint ``{"state_dict": {...}, "epoch": 300}``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    if is_zip(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80":     # a pickle: torch < 1.6 starts with its magic number
        return _load_legacy(path)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: this is the tar-based format of torch < 0.4, which is not supported; "
                              "re-save it with torch>=1.6 (torch.save(torch.load(f), g))")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")


# what zipfile raises for a damaged archive (bad headers, CRC, offsets, compression, names)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, struct.error,
               UnicodeDecodeError, RuntimeError)   # RuntimeError: "encrypted, password required"


def is_zip(path):
    """zipfile.is_zipfile, which lets some errors of a damaged archive through: those mean yes, a damaged one."""
    try:
        return zipfile.is_zipfile(path)
    except _ZIP_ERRORS:
        return True


def _load_zip(path):
    try:
        return _read_zip(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: damaged zip archive ({type(e).__name__}: {e}); is the file complete?") from None


def _read_zip(path):
    zf = zipfile.ZipFile(path)
    with zf:
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if not pkl:
            raise CheckpointError(f"{path}: a zip file without <dir>/data.pkl is not a PyTorch checkpoint")
        prefix = pkl[0][:-len("data.pkl")]
        big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        storages = {}

        def storage(pid):
            storage_type, key, numel, _ = _storage_pid(pid, path)
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointError(f"{path}: missing storage record {record}")
                size = zf.getinfo(record).file_size
                if size != numel * _itemsize(storage_type.dtype):
                    raise CheckpointError(f"{path}: storage {key} holds {size} bytes, its tensor record "
                                          f"says {numel} x {storage_type.name}; the file is corrupt")
                st = _Storage(storage_type.dtype, numel, key)
                with zf.open(record) as stream:
                    st.array = _read_storage(stream, st.dtype, numel, big)
                storages[key] = st
            elif storages[key].dtype != storage_type.dtype:
                raise CheckpointError(f"{path}: storage {key} is read as two dtypes")
            return storages[key]

        with zf.open(pkl[0]) as f:
            return restricted_load(f, path, _torch_globals(path), storage, what=pkl[0])


def _load_legacy(path):
    """torch < 1.6: magic, protocol, sys_info, the object, storage keys, then raw storages."""
    with open(path, "rb") as f:
        # data is admitted here so that a misnamed Paddle pickle gets the message below, not a refusal
        magic = restricted_load(f, path, {**NUMPY_GLOBALS(path), **CONTAINER_GLOBALS(path)}, what="the first pickle")
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: a pickle but not a PyTorch checkpoint; if it was written by torch < 1.6, "
                                  "re-save it with torch>=1.6 (torch.save(torch.load(f), g)); if by paddle.save "
                                  "or PASSL, name it .pdparams / .pd")
        restricted_load(f, path, {}, what="the protocol version")
        sys_info = restricted_load(f, path, {}, what="the system information")
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported; "
                                  "re-save it with torch>=1.6")
        storages, views = {}, []

        def storage(pid):
            storage_type, key, numel, view_metadata = _storage_pid(pid, path)
            if key not in storages:
                storages[key] = _Storage(storage_type.dtype, numel, key)
            base = storages[key]
            if base.dtype != storage_type.dtype or base.numel != numel:
                raise CheckpointError(f"{path}: storage {key} is declared twice differently")
            if view_metadata is None:
                return base
            if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3
                    and all(type(v) is int and v >= 0 for v in view_metadata[1:])
                    and view_metadata[1] + view_metadata[2] <= numel):
                raise CheckpointError(f"{path}: storage view {view_metadata!r} outside storage {key} of {numel}")
            view = _Storage(base.dtype, view_metadata[2], f"{key}[{view_metadata[1]}:]")
            views.append((view, base, view_metadata[1]))
            return view

        # tensors stay placeholders until the storages below are read
        obj = restricted_load(f, path, _torch_globals(path), storage, what="the object", resolve=False)
        keys = restricted_load(f, path, {}, what="the storage keys")
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: corrupt storage key list")
        remaining = os.fstat(f.fileno()).st_size - f.tell()
        for key in keys:
            st = storages.get(str(key))
            if st is None or st.array is not None:
                raise CheckpointError(f"{path}: storage key {key!r} is not used by any tensor, or listed twice")
            head = f.read(8)
            numel = struct.unpack("<q", head)[0] if len(head) == 8 else -1
            nbytes = numel * _itemsize(st.dtype)
            if numel != st.numel or nbytes > remaining:
                raise CheckpointError(f"{path}: storage {key}: the file holds {numel} elements where the "
                                      f"tensors expect {st.numel}, or is truncated")
            remaining -= 8 + nbytes
            try:
                st.array = _read_storage(f, st.dtype, numel)
            except EOFError:
                raise CheckpointError(f"{path}: truncated file (storage {key})") from None
        for view, base, offset in views:
            if base.array is not None:
                view.array = base.array[offset:offset + view.numel]
            view.users, base.users = view.users + 2, base.users + 2   # shared memory: their tensors copy
    return resolve_placeholders(obj, path)


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
                _write_record(zf, f"{prefix}/data/{storage.key}", storage.array.reshape(-1).view(np.uint8))
            _write_record(zf, f"{prefix}/version", b"3\n")
    return path
