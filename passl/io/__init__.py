"""Every weights, checkpoint and label-map format this project reads or writes; none can run code.

| format       | suffixes                            | read by                          | written by             |
|--------------|-------------------------------------|----------------------------------|------------------------|
| pytorch      | .pth .pth.tar .pt .tar .bin         | pth.load_pth (zip and torch<1.6) | pth.save_pth           |
| paddle       | .pdparams .pdopt .pdckpt, PASSL .pd | paddle_pickle.read_paddle        | paddle_pickle.write_paddle (paddle.save) |
| safetensors  | .safetensors                        | safetensors_io.read_safetensors  | safetensors_io.write_safetensors |
| npy          | .npy (one array: a label map)       | numpy.load(allow_pickle=False)   | numpy.save             |

The pickle-based formats go through one restricted unpickler (passl.io.unpickle) that admits only
data and the tensor-rebuild calls of the format, and refuses anything else with a CheckpointError
naming the file and what it met. :func:`read_state` finds the format from the file's content and
checks it against the suffix: a file that is not what its name says is an error, not a guess.
Arrays come back as numpy arrays; conversion to paddle tensors happens where a model needs them.
"""
import os
from typing import Callable, NamedTuple, Tuple

import numpy as np

from passl.errors import CheckpointError
from passl.io.paddle_pickle import PaddleGeneratorState, read_paddle, write_paddle
from passl.io.pth import is_torch_legacy, is_zip, load_pth, save_pth
from passl.io.safetensors_io import read_safetensors, safetensors_metadata, write_safetensors

__all__ = ["FORMATS", "Format", "read_state", "format_of", "write_weights", "load_pth", "save_pth", "read_paddle",
           "write_paddle", "read_safetensors", "write_safetensors", "safetensors_metadata", "PaddleGeneratorState"]


def _read_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError for object arrays and bad headers
        raise CheckpointError(f"{path}: not a readable .npy array of numbers ({e})") from None


class Format(NamedTuple):
    name: str
    description: str
    suffixes: Tuple[str, ...]
    read: Callable
    write: Callable = None


FORMATS = {f.name: f for f in (
    Format("pytorch", "a PyTorch checkpoint", (".pth", ".pth.tar", ".pt", ".tar", ".bin"), load_pth, save_pth),
    Format("paddle", "a Paddle pickle (paddle.save, PASSL)", (".pdparams", ".pdopt", ".pdckpt", ".pd"),
           read_paddle, write_paddle),
    Format("safetensors", "a safetensors file", (".safetensors",), read_safetensors, write_safetensors),
    Format("npy", "a numpy .npy array", (".npy",), _read_npy, None),
)}


def _format_by_suffix(path):
    name = os.path.basename(path).lower()
    matches = [(len(s), f) for f in FORMATS.values() for s in f.suffixes if name.endswith(s)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def _formats_by_content(path):
    """The formats whose layout the file's first bytes match (a pickle: torch < 1.6 or Paddle)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or is_zip(path) or is_torch_legacy(head):
        return (FORMATS["pytorch"],)
    if head.startswith(b"\x93NUMPY"):
        return (FORMATS["npy"],)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (FORMATS["paddle"], FORMATS["pytorch"])
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return (FORMATS["safetensors"],)
    return ()


def format_of(path):
    """The :class:`Format` of ``path`` from its content, checked against its suffix.

    CheckpointError when the file is missing, is no known format, or is not what its suffix says."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; name a weights or checkpoint file in it (e.g. latest.pdckpt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    named, content = _format_by_suffix(path), _formats_by_content(path)
    if not content:
        if named is not None:
            named.read(path)    # raises the format's own, more precise error
        known = "; ".join(f"{f.description} ({' '.join(f.suffixes)})" for f in FORMATS.values())
        raise CheckpointError(f"{path}: not a weights or checkpoint file this project reads: {known}")
    if named is None:
        return content[0]
    if named not in content:
        raise CheckpointError(f"{path}: named like {named.description} but holds {content[0].description}; "
                              f"rename it to end in {content[0].suffixes[0]}")
    return named


def read_state(path, to_paddle=False):
    """Whatever ``path`` holds (a state dict, a checkpoint dict, ...) with tensors as numpy arrays.

    ``to_paddle`` (Paddle pickles only): tensors as ``paddle.Tensor`` and random-generator states as
    Paddle's ``GeneratorState``, i.e. exactly what ``paddle.load`` returned for our own checkpoints.
    """
    fmt = format_of(path)
    if fmt.name == "paddle":
        return read_paddle(path, to_paddle)
    return fmt.read(os.fspath(path))


def write_weights(state_dict, path, metadata=None):
    """Write ``state_dict`` ({name: numpy array or paddle Tensor}) in the format of ``path``'s suffix
    (.pdparams, .safetensors or .pth), atomically. ``metadata`` ({str: value}) is stored in a
    .safetensors file; the other formats have no place for it."""
    fmt = _format_by_suffix(os.fspath(path))
    if fmt is None or fmt.write is None or fmt.name == "npy":
        raise CheckpointError(f"{path}: weights are written as .pdparams, .safetensors or .pth")
    arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v.numpy()) for k, v in state_dict.items()}
    if fmt.name == "safetensors":
        return write_safetensors(arrays, path, metadata)
    return fmt.write(arrays, path)
