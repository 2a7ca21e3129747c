"""Paddle's pickles: ``paddle.save`` files (.pdparams, .pdopt, .pdckpt) and PASSL v1.1 checkpoints (.pd).

What ``paddle.save`` writes (Paddle 3.x, paddle/framework/io.py and io_utils.py), pickle protocol 4
by default:

- a dict whose values are all tensors (a Layer or optimizer state dict) becomes a dict of numpy
  arrays plus ``"StructuredToParameterName@@": {key: tensor name}``; with protocol 2 or 3 an array
  over 2**30 bytes is split into ``key@@.0``, ``key@@.1``, ... listed in
  ``"UnpackBigParamInfor@@": {key: {"OriginShape": shape, "slices": [names]}}`` (protocol 4, the
  default, writes arrays of any size whole, as 8-byte-length BINBYTES8 records);
- anything else (a checkpoint holding state dicts, numbers, lists) is pickled with every tensor
  written as the call ``tuple((name, ndarray))`` and every DenseTensor as ``eval('data', {'data':
  ndarray})``; ``paddle.get_rng_state()`` values as ``paddle.base.libpaddle.GeneratorState`` objects
  (NEWOBJ, then BUILD with ``(device, seed, offset, [character codes of the generator state])``).

PASSL v1.1's CheckpointHook pickles ``{epoch, state_dict, optimizer, lr_scheduler}`` itself, the
tensors already converted to numpy arrays (``epoch_<n>.pd``, ``latest.pd``).

The reader admits numpy arrays and scalars, containers, and exactly those three call shapes:
``builtins.tuple`` only as ``tuple((str, array))`` and ``builtins.eval`` only as
``eval('data', {'data': array})`` - both turned into the array here, neither ever called - and
``GeneratorState`` as a record whose state is checked to be numbers. Anything else is refused.
"""
import os
from typing import NamedTuple

import numpy as np

from passl.errors import CheckpointError
from passl.io.unpickle import CONTAINER_GLOBALS, NUMPY_GLOBALS, Placeholder, is_array, refuse, restricted_load
from passl.utils.fileio import atomic_path

__all__ = ["read_paddle", "write_paddle", "PaddleGeneratorState", "NAME_TABLE", "SPLIT_TABLE"]

NAME_TABLE = "StructuredToParameterName@@"
SPLIT_TABLE = "UnpackBigParamInfor@@"
_GENERATOR_MODULES = ("paddle.base.libpaddle", "paddle.base.core", "paddle.fluid.libpaddle", "paddle.fluid.core_avx",
                      "paddle.fluid.core")


class PaddleGeneratorState(NamedTuple):
    """A ``paddle.get_rng_state()`` entry as data: device, seed, offset and the generator's state text."""

    device: int
    seed: int
    offset: int
    state: str

    def to_paddle(self):
        """The ``paddle.base.core.GeneratorState`` for ``paddle.set_rng_state``."""
        import paddle
        cls = paddle.base.core.GeneratorState
        generator = cls.__new__(cls)
        generator.__setstate__((self.device, self.seed, self.offset, [ord(c) for c in self.state]))
        return generator


def _describe(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _paddle_globals(path, to_paddle, counter):
    """find_class table of a Paddle pickle; ``counter`` counts the tensor records met."""

    class Tensor(Placeholder):
        """A tensor record: its array (or, with ``to_paddle``, a paddle.Tensor made from it)."""

        __slots__ = ("array",)

        def __init__(self, array):
            self.array = array
            counter[0] += 1

        def resolve(self, where):
            array, self.array = self.array, None
            if isinstance(array, Placeholder):
                array = array.resolve(where)
            return _to_tensor(array) if to_paddle else array

    def tensor(items=None, *extra):
        if extra or not (isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str)
                         and is_array(items[1])):
            raise refuse(path, f"builtins.tuple({_describe(items)})",
                         "paddle.save writes tuple((name, array)) for a tensor, and nothing else is read")
        return Tensor(items[1])

    def dense_tensor(source=None, scope=None, *extra):
        if extra or source != "data" or not (isinstance(scope, dict) and list(scope) == ["data"]
                                             and is_array(scope["data"])):
            raise refuse(path, f"builtins.eval({_describe(source)})",
                         "paddle.save writes eval('data', {'data': array}) for a DenseTensor; that is read "
                         "as the array without calling eval, and nothing else is read")
        return Tensor(scope["data"])

    class GeneratorState(Placeholder):
        """``GeneratorState`` from NEWOBJ + BUILD; its state must be three integers and the state text."""

        __slots__ = ("state",)

        def __setstate__(self, state):
            if not (isinstance(state, tuple) and len(state) == 4 and all(type(v) is int for v in state[:3])
                    and isinstance(state[3], list) and len(state[3]) < 1 << 16
                    and all(type(c) is int and 32 <= c < 127 for c in state[3])):
                raise refuse(path, f"a GeneratorState with state {_describe(state)}",
                             "a random-generator state is three integers and a list of character codes")
            self.state = state

        def resolve(self, where):
            state = getattr(self, "state", None)
            if state is None:
                raise CheckpointError(f"{path}: GeneratorState at {where} has no state")
            record = PaddleGeneratorState(*state[:3], "".join(map(chr, state[3])))
            if not to_paddle:
                return record
            try:
                return record.to_paddle()
            except Exception as e:  # noqa: BLE001 - Paddle raises RuntimeError for a malformed state
                raise CheckpointError(f"{path}: random-generator state at {where} is malformed ({e})") from None

    table = {**NUMPY_GLOBALS(path), **CONTAINER_GLOBALS(path),
             ("builtins", "tuple"): tensor, ("builtins", "eval"): dense_tensor}
    table.update({(module, "GeneratorState"): GeneratorState for module in _GENERATOR_MODULES})
    return table


def _to_tensor(array):
    import paddle
    return paddle.to_tensor(array)


def read_paddle(path, to_paddle=False):
    """Read a ``paddle.save`` pickle (.pdparams / .pdopt / .pdckpt) or a PASSL v1.1 checkpoint (.pd)
    without running code from it.

    Returns the saved object: tensors as numpy arrays (with ``to_paddle``: as ``paddle.Tensor``, and
    generator states as ``GeneratorState``, i.e. what ``paddle.load`` returns), the name table of a
    state dict dropped and split big arrays joined.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    counter = [0]
    with open(path, "rb") as f:
        obj = restricted_load(f, path, _paddle_globals(path, to_paddle, counter), what="the pickle")
    if isinstance(obj, dict) and SPLIT_TABLE in obj:
        _join_split_arrays(obj, path)
    if isinstance(obj, dict) and NAME_TABLE in obj:
        names = obj.pop(NAME_TABLE)
        if not isinstance(names, dict):
            raise CheckpointError(f"{path}: corrupt {NAME_TABLE} table")
        if to_paddle:   # paddle.load: the arrays of a state dict are tensors
            for key in names:
                if isinstance(obj.get(key), np.ndarray):
                    obj[key] = _to_tensor(obj[key])
    elif to_paddle and counter[0] == 0:
        obj = _arrays_to_tensors(obj)   # paddle.load: a file without tensor records holds tensors as arrays
    return obj


def _join_split_arrays(obj, path):
    """paddle.save with protocol 2/3 splits arrays over 2**30 bytes; join them as paddle.load does."""
    info = obj.pop(SPLIT_TABLE)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt {SPLIT_TABLE} table")
    for key, entry in info.items():
        try:
            shape = tuple(int(n) for n in entry["OriginShape"])
            parts = [obj.pop(name) for name in entry["slices"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt split of '{key}' in {SPLIT_TABLE}") from None
        if not parts or not all(isinstance(p, np.ndarray) and p.ndim == 1 for p in parts) \
                or sum(p.size for p in parts) != int(np.prod(shape)):
            raise CheckpointError(f"{path}: the slices of '{key}' do not add up to shape {list(shape)}")
        obj[key] = np.concatenate(parts).reshape(shape)


def _arrays_to_tensors(obj):
    if isinstance(obj, np.ndarray):
        return _to_tensor(obj)
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _arrays_to_tensors(obj[key])
        return obj
    if isinstance(obj, list):
        return [_arrays_to_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_arrays_to_tensors(v) for v in obj)
    return obj


def write_paddle(obj, path, needed=None):
    """``paddle.save(obj, path)`` through a temporary file and a rename: a crash leaves the old file, a
    failed write (disk full: ``needed`` bytes, for the message) raises WriteError naming it.
    Writing is safe; :func:`read_paddle` reads the result back."""
    import paddle
    with atomic_path(path, needed) as tmp:
        paddle.save(obj, tmp)
    return path
