"""The one restricted unpickler: a pickle may build data, never run code.

A pickle is a small program: ``GLOBAL module.name`` imports anything and ``REDUCE`` calls it, which
is how a crafted file runs ``os.system``. Here every import goes through a table of what the format
is allowed to hold; a name outside the table raises :class:`CheckpointError` ("refuses os.system")
before anything is imported or called. The table maps each admitted name to a builder written in
this package, which checks its arguments and returns data (never the real ``eval``, ``tuple`` or
``numpy`` setstate on unchecked input).

What every table admits (``NUMPY_GLOBALS``, ``CONTAINER_GLOBALS``): numpy arrays of numbers or bools
(both numpy 1.x ``numpy.core`` and 2.x ``numpy._core`` names, pickle protocols 2-5), numpy scalars,
``collections.OrderedDict``, sets, complex numbers, and the ``_codecs.encode(str, 'latin1')`` that
protocol 2 uses for bytes. Formats add their own tensor-rebuild calls (``passl.io.pth``,
``passl.io.paddle_pickle``).

Builders may return placeholders (an array whose bytes arrive with the next BUILD opcode, a tensor
whose storage is read later); :func:`restricted_load` replaces them, after the pickle is read, by
calling ``resolve(where)`` with the key path of each, so errors can name the tensor.
"""
import collections
import pickle
import re

import numpy as np

from passl.errors import CheckpointError

__all__ = ["restricted_load", "resolve_placeholders", "Placeholder", "NUMPY_GLOBALS", "CONTAINER_GLOBALS", "refuse",
           "is_array"]

# numpy dtypes an array in a weights file may have: bool, (unsigned) integers, floats, complex
_DTYPE_SPEC = re.compile(r"^(b1|\?|[iu][1248]|f(2|4|8|12|16)|c(8|16|24|32))$")
_NUMPY_MODULES = {"numpy.core.multiarray": "multiarray", "numpy._core.multiarray": "multiarray",
                  "numpy.core.numeric": "numeric", "numpy._core.numeric": "numeric"}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def refuse(path, what, why="a weights file holds arrays, numbers, strings and containers only"):
    """CheckpointError saying that ``path`` asked for ``what`` and that it was not run."""
    return CheckpointError(f"{path}: refuses {what}: {why}; nothing in the file was run (ask its author for "
                           "a plain state dict or a .safetensors file)")


class Placeholder:
    """Something built while unpickling that becomes data afterwards (``resolve``)."""

    __slots__ = ()

    def resolve(self, where):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# numpy: dtype, array, scalar; rebuilt from checked arguments

class _NDArrayType:
    """Stands for ``numpy.ndarray`` in ``_reconstruct(ndarray, (0,), b'b')``; not callable."""

    __slots__ = ()


_NDARRAY = _NDArrayType()


class _DType(Placeholder):
    """``numpy.dtype(spec, align, copy)`` followed by BUILD (byte order)."""

    __slots__ = ("spec", "byteorder", "path")

    def __init__(self, spec, path):
        self.spec, self.byteorder, self.path = spec, "=", path

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                and state[5:7] == (-1, -1) and (len(state) == 8 or state[8] is None)):
            raise refuse(self.path, f"a numpy dtype '{self.spec}' with fields or metadata {state!r}",
                         "only plain numeric dtypes are read")
        self.byteorder = state[1]

    @property
    def dtype(self):
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" and dtype.itemsize > 1 else dtype

    def resolve(self, where):
        return self.dtype


def _dtype_builder(path):
    def dtype(spec, align=False, copy=False, *extra):
        if not (isinstance(spec, str) and _DTYPE_SPEC.match(spec)) or extra:
            raise refuse(path, f"numpy dtype {spec!r}", "only arrays of numbers and bools are read")
        return _DType(spec, path)
    return dtype


def _checked_dtype(dtype, path):
    if not isinstance(dtype, _DType):
        raise refuse(path, f"an array of {type(dtype).__name__}", "array dtypes must be numpy dtypes")
    return dtype.dtype


def _checked_shape(shape, path):
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: corrupt array shape {shape!r}")
    return shape


def _numel(shape):
    count = 1
    for n in shape:
        count *= n
    return count


class _Array(Placeholder):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` followed by BUILD with
    ``(version, shape, dtype, is_fortran, raw bytes)``; checked, then made by numpy's own setstate,
    which keeps the array on the pickle's bytes (no copy) and writeable."""

    __slots__ = ("array", "path")

    def __init__(self, path):
        self.array, self.path = None, path

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 4:    # numpy < 1.? wrote no version
            state = (1,) + state
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise CheckpointError(f"{self.path}: corrupt numpy array state")
        _, shape, dtype, fortran, raw = state
        shape, dtype = _checked_shape(shape, self.path), _checked_dtype(dtype, self.path)
        if not isinstance(raw, (bytes, bytearray)):
            raise refuse(self.path, "a numpy array of Python objects", "only arrays of numbers and bools are read")
        if len(raw) != _numel(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: corrupt numpy array: {len(raw)} bytes for shape {shape} "
                                  f"of {dtype}")
        array = np.ndarray.__new__(np.ndarray, (0,), "b")
        array.__setstate__((1, shape, dtype, bool(fortran), raw))
        self.array = array

    def resolve(self, where):
        """The array, handed over once (this placeholder then lets go of it, so that a caller that
        converts it, e.g. to a paddle Tensor, frees the pickle's bytes as it goes)."""
        array, self.array = self.array, None
        if array is None:
            raise CheckpointError(f"{self.path}: numpy array at {where or 'top level'} has no data")
        return array


def _numpy_builders(path):
    def reconstruct(subtype, shape, typecode):
        if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise refuse(path, f"numpy _reconstruct of {type(subtype).__name__}", "only plain numpy arrays are read")
        return _Array(path)

    def scalar(dtype, raw=None):
        dtype = _checked_dtype(dtype, path)
        if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
            raise CheckpointError(f"{path}: corrupt numpy scalar of {dtype}")
        return np.frombuffer(raw, dtype)[0]

    def frombuffer(buffer, dtype, shape, order):   # pickle protocol 5
        if isinstance(buffer, pickle.PickleBuffer):
            buffer = buffer.raw()
        dtype, shape = _checked_dtype(dtype, path), _checked_shape(shape, path)
        if not isinstance(buffer, (bytes, bytearray, memoryview)) or order not in ("C", "F") \
                or len(buffer) != _numel(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: corrupt numpy array (protocol 5)")
        return np.frombuffer(buffer, dtype).reshape(shape, order=order)

    return {("multiarray", "_reconstruct"): reconstruct, ("multiarray", "scalar"): scalar,
            ("numeric", "_frombuffer"): frombuffer}


def NUMPY_GLOBALS(path):
    """find_class table for numpy arrays, dtypes and scalars (both numpy 1.x and 2.x module names)."""
    builders = _numpy_builders(path)
    table = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype_builder(path)}
    for module, short in _NUMPY_MODULES.items():
        for (owner, name), builder in builders.items():
            if owner == short:
                table[(module, name)] = builder
    return table


# ---------------------------------------------------------------------------------------------
# containers and the odd protocol-2 spellings

def CONTAINER_GLOBALS(path):
    def encode(text, encoding="latin1"):   # how protocol 2 writes bytes from Python 3
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise refuse(path, f"_codecs.encode(..., {encoding!r})")
        return text.encode("latin1")

    def ordered_dict(items=()):
        if not isinstance(items, (list, tuple)):
            raise CheckpointError(f"{path}: corrupt OrderedDict")
        return collections.OrderedDict(items)

    def from_list(kind):
        def build(items=()):
            if not isinstance(items, (list, tuple)):
                raise CheckpointError(f"{path}: corrupt {kind.__name__}")
            return kind(items)
        return build

    def complex_number(real=0.0, imag=0.0):
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise CheckpointError(f"{path}: corrupt complex number")
        return complex(real, imag)

    return {("collections", "OrderedDict"): ordered_dict, ("builtins", "set"): from_list(set),
            ("builtins", "frozenset"): from_list(frozenset), ("builtins", "complex"): complex_number,
            ("_codecs", "encode"): encode}


# ---------------------------------------------------------------------------------------------
# the unpickler

class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path, table, persistent_load=None):
        super().__init__(file, encoding="latin1")
        self._path, self._table, self._persistent = path, table, persistent_load

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        builder = self._table.get((module, name))
        if builder is None:
            raise refuse(self._path, f"{module}.{name}")
        return builder

    def persistent_load(self, pid):
        if self._persistent is None:
            raise refuse(self._path, f"a persistent reference {str(pid)[:80]!r}",
                         "this format has no external storages")
        return self._persistent(pid)


def restricted_load(file, path, table, persistent_load=None, what="pickle", resolve=True):
    """Unpickle one object from ``file`` (binary file object) admitting only the globals in ``table``
    ({(module, name): builder}); then (unless ``resolve`` is False) replace every :class:`Placeholder`
    by its data.

    ``path`` names the file in errors; ``what`` names the pickle in the file (e.g. "the magic number").
    Returns the object; raises CheckpointError for anything refused, truncated or corrupt.
    """
    unpickler = _Unpickler(file, path, table, persistent_load)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply to be a weights file") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{path}: {what} cannot be read ({type(e).__name__}: {e}); "
                              "is the file complete?") from None
    del unpickler   # drop its memo: the arrays then own the only references to their bytes
    return resolve_placeholders(obj, path) if resolve else obj


def resolve_placeholders(obj, path):
    """Replace placeholders in nested dicts / lists / tuples / sets; key paths name them in errors."""
    seen = {}
    try:
        return _resolve(obj, "", seen)
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a weights file") from None


def is_array(obj):
    """True for a numpy array or an array placeholder (the argument of a tensor-rebuild call)."""
    return isinstance(obj, (np.ndarray, _Array))


def _resolve(obj, where, seen):
    """``seen``: id -> (object, result); the object is kept so that its id is not reused meanwhile."""
    if isinstance(obj, (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic)):
        return obj
    key = id(obj)
    if key in seen:
        return seen[key][1]
    if isinstance(obj, Placeholder):
        value = _resolve(obj.resolve(where), where, seen)
    elif isinstance(obj, dict):      # in place: keeps OrderedDict order and shared references
        seen[key] = (obj, obj)
        for k in list(obj):
            obj[k] = _resolve(obj[k], f"{where}/{k}" if where else str(k), seen)
        return obj
    elif isinstance(obj, list):
        seen[key] = (obj, obj)
        for i, v in enumerate(obj):
            obj[i] = _resolve(v, f"{where}[{i}]", seen)
        return obj
    elif isinstance(obj, tuple):
        items = [_resolve(v, f"{where}[{i}]", seen) for i, v in enumerate(obj)]
        value = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)   # a NamedTuple keeps its type
    elif isinstance(obj, (set, frozenset)):
        value = type(obj)(_resolve(v, where, seen) for v in obj)
    else:
        return obj
    seen[key] = (obj, value)
    return value

