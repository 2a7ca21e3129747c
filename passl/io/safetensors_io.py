"""``.safetensors`` weights: a JSON header (names, dtypes, shapes, byte ranges) and raw bytes.

The format cannot hold code; the ``safetensors`` package checks the header (every byte range inside
the file, no overlaps) before any tensor is read. Files written here carry metadata strings, among
them ``variant`` and ``img_size``.
"""
import collections
import json
import os

import numpy as np

from passl.errors import CheckpointError
from passl.utils.fileio import atomic_path

__all__ = ["read_safetensors", "safetensors_metadata", "write_safetensors"]


def _open(path):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike mean an unusable file
        raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from None


def read_safetensors(path):
    """{name: numpy array} of a .safetensors file (bfloat16 widened to float32), in file order."""
    path = os.fspath(path)
    out = collections.OrderedDict()
    with _open(path) as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":   # numpy has no bfloat16
                out[name] = _read_bfloat16(path, name)
            else:
                out[name] = f.get_tensor(name)
    return out


def _read_bfloat16(path, name):
    """A BF16 tensor as float32, from the header that safe_open has already validated."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        halves = np.frombuffer(f.read(end - start), dtype="<u2")
    return (halves.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def safetensors_metadata(path):
    """The metadata strings of a .safetensors file ({} when it has none)."""
    with _open(os.fspath(path)) as f:
        return dict(f.metadata() or {})


def write_safetensors(state_dict, path, metadata=None):
    """Write ``state_dict`` ({name: numpy array or paddle Tensor}) to ``path`` atomically, with
    ``metadata`` ({str: value}; values are stored as strings, lists and dicts as JSON). A failed write
    (disk full, read-only folder) raises WriteError naming ``path``."""
    from safetensors.numpy import save_file
    tensors = {}
    for name, value in state_dict.items():
        array = value if isinstance(value, np.ndarray) else np.asarray(value.numpy())
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        tensors[str(name)] = array if array.flags.c_contiguous else np.array(array, order="C")
    text = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, sum(t.nbytes for t in tensors.values())) as tmp:
        save_file(tensors, tmp, metadata=text)
    return path
