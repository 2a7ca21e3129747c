"""Label stores: where the dense [2, K, H, W] label map of each training image comes from.

A label map (SPEC 4) holds, per map cell, an annotator's top-K scores (``map[0]``, logits) and their
class indices stored as floats (``map[1]``). Every store is keyed by the image's path relative to the
dataset root *without its extension* (``n01440764/n01440764_10026``), and knows its *coverage*:

- ``center_square``: the map covers the centred square of side min(W, H) (the published maps);
- ``full``: the map covers the whole image (maps made by this project's own generator).

Stores (registered in LABEL_STORES):

- ``npy``:    ``root/<class_dir>/<stem>.npy`` per image, float16 or float32 (the Paddle community release)
- ``pth``:    ``root/<class_dir>/<stem>.pth`` per image (the PyTorch release), read without torch and
  without running code from the file (passl.io.pth)
- ``packed``: ``root/labels.npy`` [M, 2, K, H, W] (a row read per map) + ``root/index.json`` (keys, coverage),
  written by :func:`pack_label_maps` (``tools/convert_labels.py --to packed``), so a run opens one file,
  not 1.28 M.
"""
import contextlib
import io
import json
import os

import numpy as np

from passl.errors import DataError
from passl.ranges import ranged
from passl.registry import LABEL_STORES
from passl.utils.fileio import atomic_path, write_text

__all__ = ["COVERAGES", "LabelStore", "NpyLabelStore", "PthLabelStore", "PackedLabelStore", "label_key",
           "coverage_region", "list_label_keys", "pack_label_maps", "write_npy_tree", "PACKED_FORMAT", "CHECKS",
           "check_content"]

COVERAGES = ("center_square", "full")
CHECKS = ("cached", "full")
PACKED_FORMAT = "passl-packed-label-maps"
PACKED_DATA, PACKED_INDEX = "labels.npy", "index.json"
MapShape = ranged(list, 1, kind=int, length=3, note="[K, H, W] of every map")


def label_key(relpath):
    """'n01/x.JPEG' -> 'n01/x': the store key of an image (posix separators, no extension)."""
    return os.path.splitext(relpath.replace(os.sep, "/"))[0]


def coverage_region(coverage, width, height):
    """(x0, y0, x1, y1) in image pixels of the part of a ``width`` x ``height`` image a map covers."""
    if coverage == "full":
        return (0.0, 0.0, float(width), float(height))
    if coverage == "center_square":
        side = float(min(width, height))
        x0, y0 = (width - side) / 2.0, (height - side) / 2.0
        return (x0, y0, x0 + side, y0 + side)
    raise DataError(f"unknown label-map coverage '{coverage}'; use one of {', '.join(COVERAGES)}")


def _check_coverage(coverage, where):
    if coverage not in COVERAGES:
        raise DataError(f"{where}: coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")


def check_content(maps, where):
    """Check a stack of label maps ``maps`` [n, 2, K, H, W] (float16/float32): finite scores, class indices
    that are whole numbers >= 0. ``where(i) -> (map path, image)`` names map i in the DataError raised for
    the first bad one. Returns the largest class index of each map, int32 [n] (the class range is
    checked against num_classes by the caller, so that one check serves any num_classes)."""
    if not np.issubdtype(maps.dtype, np.floating):
        path, image = where(0)
        raise DataError(f"label map {path} (for image {image}) holds {maps.dtype}; expected float16 or float32")
    count = len(maps)
    if maps.dtype == np.float16:   # numpy's float16 arithmetic is slow: test the exponent bits, convert the classes
        finite = ((maps.view(np.uint16) & 0x7C00) != 0x7C00).reshape(count, -1).all(1)
        flat_classes = maps[:, 1].reshape(count, -1).astype(np.float32)
    else:
        finite = np.isfinite(maps.reshape(count, -1)).all(1)
        flat_classes = maps[:, 1].reshape(count, -1)
    whole = (flat_classes == np.rint(flat_classes)).all(1) & (flat_classes.min(1, initial=0) >= 0)
    bad = np.flatnonzero(~(finite & whole))
    if bad.size:
        path, image = where(int(bad[0]))
        what = "non-finite values (NaN or inf)" if not finite[bad[0]] else \
            "class indices that are negative or not whole numbers"
        raise DataError(f"label map {path} (for image {image}) holds {what}; it is damaged or not a label map "
                        "([2, K, H, W]: scores, then class indices). Regenerate or remove it"
                        + (f" ({bad.size} such maps in this batch of {count})" if bad.size > 1 else ""))
    return np.rint(flat_classes.max(1, initial=0)).astype(np.int32)


class LabelStore:
    """Base class. Subclasses implement ``path(key)``, ``_shape(key)`` and ``_read(key)``; ``stat`` and
    ``validate`` serve the start-up check (passl.data.label_index).

    ``allow_missing``: images without a map train with their one-hot label instead of failing the build.
    ``map_shape``: expected [K, H, W]; when null, the first map checked sets it for the rest.
    ``check``: how the start-up check uses its index (passl.data.label_index): ``cached`` re-reads only
    the maps whose size or modification time changed since the last check; ``full`` reads every map.
    ``index_dir``: where that index is kept (null: ``<root>/.passl_index`` when writable, else output_dir).
    """

    suffix = ""

    def __init__(self, root, coverage="center_square", allow_missing=False, map_shape=None, check="cached",
                 index_dir=None):
        self.root = root
        self.coverage = coverage
        self.allow_missing = allow_missing
        self.map_shape = tuple(map_shape) if map_shape is not None else None
        if check not in CHECKS:
            raise DataError(f"label store at {root}: check must be one of {', '.join(CHECKS)}, got {check!r}")
        self.check_mode, self.index_dir = check, index_dir
        if coverage is not None:
            _check_coverage(coverage, f"label store at {root}")

    def path(self, key):
        return os.path.join(self.root, key + self.suffix)

    def __contains__(self, key):
        return os.path.isfile(self.path(key))

    def keys(self):
        """Every key this store holds (sorted)."""
        return list_label_keys(self.root, self.suffix)

    def check(self, key, image=None):
        """Raise DataError unless the map of ``key`` exists and has shape [2, *map_shape].
        Returns False when it is missing and ``allow_missing`` is set, else True."""
        if key not in self:
            if self.allow_missing:
                return False
            raise DataError(f"no label map for image {image or key}: looked for {self.path(key)}. "
                            "Point label_store.root at the label-map folder, or set "
                            "label_store.allow_missing: true to train such images on their image label")
        self._check_shape(self._shape(key), key, image)
        return True

    def _check_shape(self, shape, key, image=None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or shape[0] != 2 or min(shape) < 1:
            raise DataError(f"label map {self.path(key)} (for image {image or key}) has shape {shape}; "
                            "expected [2, K, H, W] (scores and class indices of the top-K classes per cell)")
        if self.map_shape is None:
            self.map_shape = shape[1:]
        elif shape[1:] != self.map_shape:
            raise DataError(f"label map {self.path(key)} (for image {image or key}) has shape {shape}; "
                            f"expected [2, {', '.join(map(str, self.map_shape))}] like the other maps")

    def signature(self):
        """The store's (size, mtime) as a whole, or None where only each map's own ``stat`` tells."""
        return None

    def stat(self, keys):
        """(size, mtime_ns) int64 arrays of the maps of ``keys``; -1 for a missing map. What the cached
        start-up check compares with its index to find the maps that changed."""
        prefix, suffix, stat = os.path.join(self.root, ""), self.suffix, os.stat
        sizes, mtimes = [-1] * len(keys), [-1] * len(keys)
        for i, key in enumerate(keys):
            try:
                st = stat(prefix + key + suffix)
            except OSError:
                continue
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
        return np.array(sizes, np.int64), np.array(mtimes, np.int64)

    def validate(self, keys, images=None):
        """Read the maps of ``keys`` (all present) and check shape, dtype and content; DataError naming
        the first bad map and its image. Returns the largest class index of each map, int32 [n]."""
        top = np.zeros(len(keys), np.int32)
        for i, key in enumerate(keys):
            image = images[i] if images is not None else None
            array = self.load(key, dtype=None)
            self._check_shape(array.shape, key, image)
            top[i] = check_content(array[None], lambda j: (self.path(key), image))[0]
        return top

    def load(self, key, dtype=np.float32):
        """The map of ``key`` as [2, K, H, W] ``dtype`` (None: as stored, float16 stays float16);
        DataError naming the file if it cannot be read."""
        try:
            array = self._read(key)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 (any decoder failure is a bad file)
            raise DataError(f"cannot read label map {self.path(key)}: {type(e).__name__}: {e}") from None
        array = np.asarray(array)
        if array.ndim != 4 or array.shape[0] != 2:
            raise DataError(f"label map {self.path(key)} has shape {tuple(array.shape)}; expected [2, K, H, W]")
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"label map {self.path(key)} holds {array.dtype}; expected float16 or float32")
        return array if dtype is None else array.astype(dtype, copy=False)


_NPY_HEADERS = {}   # header bytes -> (shape, fortran_order, dtype): the maps of a store share one header


def _parse_npy(data):
    """[2, K, H, W] array (read-only, on ``data``'s bytes) from the bytes of a .npy file; ValueError if
    they are not one, hold Python objects (never unpickled) or are shorter than the header says."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file (no numpy magic string)")
    if data[6] == 1:
        start, length = 10, int.from_bytes(data[8:10], "little")
    else:
        start, length = 12, int.from_bytes(data[8:12], "little")
    header = bytes(data[:start + length])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        parsed = _npy_header_of(io.BytesIO(header))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = parsed
    shape, fortran, dtype = parsed
    count = int(np.prod(shape))
    if len(data) - len(header) < count * dtype.itemsize:
        raise ValueError(f"truncated: {len(data)} bytes, the header promises {len(header) + count * dtype.itemsize}")
    return np.frombuffer(data, dtype, count, len(header)).reshape(shape, order="F" if fortran else "C")


def _npy_header_of(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("it holds Python objects (a pickle), which is refused: a label map is an array of numbers")
    return shape, fortran, dtype


@LABEL_STORES.register("npy")
class NpyLabelStore(LabelStore):
    """Per-image ``root/<class_dir>/<stem>.npy`` files holding [2, K, H, W] float16/float32."""

    suffix = ".npy"

    def __init__(self, root: str, coverage: str = "center_square", allow_missing: bool = False,
                 map_shape: MapShape = None, check: str = "cached", index_dir: str = None):
        super().__init__(root, coverage, allow_missing, map_shape, check, index_dir)

    def _shape(self, key):
        return self.load(key, dtype=None).shape

    def _read(self, key):
        with open(self.path(key), "rb") as f:
            data = f.read()
        try:
            return _parse_npy(data)   # never unpickles
        except ValueError as e:
            raise DataError(f"label map {self.path(key)} is not a readable .npy file: {e}") from None

    def validate(self, keys, images=None):
        """As LabelStore.validate, one file read each and the content checked for all maps at once."""
        arrays = [self.load(key, dtype=None) for key in keys]
        groups = {}
        for i, array in enumerate(arrays):
            groups.setdefault((array.shape, array.dtype.str), []).append(i)
        top = np.zeros(len(keys), np.int32)
        for members in groups.values():
            first = members[0]
            self._check_shape(arrays[first].shape, keys[first], images[first] if images is not None else None)
            stacked = np.stack([arrays[i] for i in members])
            top[members] = check_content(stacked, lambda j: (self.path(keys[members[j]]),
                                                             images[members[j]] if images is not None else None))
        return top


@LABEL_STORES.register("pth")
class PthLabelStore(LabelStore):
    """Per-image ``root/<class_dir>/<stem>.pth`` files of the PyTorch release (read without torch).

    The build-time check parses every file (a few KB each); for ImageNet-scale runs convert the tree
    once with ``tools/convert_labels.py`` to ``npy`` or ``packed``.
    """

    suffix = ".pth"

    def __init__(self, root: str, coverage: str = "center_square", allow_missing: bool = False,
                 map_shape: MapShape = None, check: str = "cached", index_dir: str = None):
        super().__init__(root, coverage, allow_missing, map_shape, check, index_dir)

    def _shape(self, key):
        return self.load(key).shape

    def _read(self, key):
        from passl.errors import CheckpointError
        from passl.io.pth import load_pth
        try:
            obj = load_pth(self.path(key))
        except CheckpointError as e:
            raise DataError(f"label map {e}") from None
        if isinstance(obj, dict) and len(obj) == 1:   # tolerate {"label": tensor}
            obj = next(iter(obj.values()))
        if not isinstance(obj, np.ndarray):
            raise DataError(f"label map {self.path(key)} holds a {type(obj).__name__}, expected one tensor")
        return obj


@LABEL_STORES.register("packed")
class PackedLabelStore(LabelStore):
    """``root/labels.npy`` [M, 2, K, H, W] (one ``pread`` per map) + ``root/index.json`` {keys, coverage}.

    ``coverage`` null takes the coverage recorded in the index; stating a different one is an error.
    """

    def __init__(self, root: str, coverage: str = None, allow_missing: bool = False, map_shape: MapShape = None,
                 check: str = "cached", index_dir: str = None):
        index_path = os.path.join(root, PACKED_INDEX)
        if not os.path.isfile(index_path):
            raise DataError(f"packed label store {root}: {index_path} not found; write it with "
                            "tools/convert_labels.py --to packed")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            assert index.get("format") == PACKED_FORMAT
        except Exception:  # noqa: BLE001
            raise DataError(f"{index_path} is not a packed label-map index written by tools/convert_labels.py "
                            "--to packed") from None
        recorded = index["coverage"]
        if coverage is not None and coverage != recorded:
            raise DataError(f"label_store.coverage is '{coverage}' but {index_path} records '{recorded}'; "
                            "remove the key or fix the index")
        super().__init__(root, recorded, allow_missing, map_shape, check, index_dir)
        # the keys as one sorted bytes array (not a dict of 1.28 M str: forked workers would copy it)
        encoded = np.array([key.encode("utf-8", "surrogateescape") for key in index["keys"]], dtype=bytes)
        if encoded.size < 2 or bool(np.all(encoded[1:] > encoded[:-1])):   # pack_label_maps writes them sorted
            self._order = np.arange(encoded.size)
        else:
            self._order = np.argsort(encoded, kind="stable")
        self._sorted = encoded[self._order]
        self._data_path = os.path.join(root, PACKED_DATA)
        self._stored_shape = tuple(index["shape"])
        self._file = None   # labels.npy as _rows_file() gives it, opened on the first read

    def path(self, key):
        return f"{self._data_path}[{key}]"

    def rows(self, keys):
        """Row of each key in labels.npy, -1 where it has none: int64 [len(keys)]."""
        if not len(keys) or not len(self._sorted):
            return np.full(len(keys), -1, np.int64)
        wanted = np.array([key.encode("utf-8", "surrogateescape") for key in keys], dtype=bytes)
        at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        return np.where(self._sorted[at] == wanted, self._order[at], -1).astype(np.int64)

    def __contains__(self, key):
        return self.rows([key])[0] >= 0

    def keys(self):
        return [key.decode("utf-8", "surrogateescape") for key in self._sorted]

    def _shape(self, key):
        return self._stored_shape

    def _rows_file(self):
        """(file descriptor, offset of row 0, dtype, bytes per row) of labels.npy, opened once per process."""
        if self._file is None:
            try:
                with open(self._data_path, "rb") as f:
                    shape, fortran, dtype = _npy_header_of(f)
                    offset = f.tell()
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {self._data_path}: {e}; write the store again with "
                                "tools/convert_labels.py") from None
            if fortran or tuple(shape[1:]) != self._stored_shape:
                raise DataError(f"{self._data_path} holds {'a Fortran-ordered ' if fortran else ''}array of shape "
                                f"{tuple(shape)}; {os.path.join(self.root, PACKED_INDEX)} says rows of "
                                f"{list(self._stored_shape)}: write the store again with tools/convert_labels.py")
            row_bytes = int(np.prod(self._stored_shape)) * dtype.itemsize
            self._file = (os.open(self._data_path, os.O_RDONLY), offset, dtype, row_bytes)
        return self._file

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._file[0])

    def _read(self, key):
        """One ``pread`` of the row: through the page cache, without mapping the file. A map of the file
        keeps every page a worker has touched, with the kernel's fault-around ~64 KiB per 4.5 KB row, in
        that worker's memory: one reading 80,000 random rows of ImageNet's store grew from 0.46 to 3.9 GB
        RSS (this way it stays flat)."""
        row = self.rows([key])[0]
        if row < 0:
            raise DataError(f"no label map for {key} in {self._data_path}")
        fd, offset, dtype, size = self._rows_file()
        data = os.pread(fd, size, offset + int(row) * size)
        if len(data) != size:
            raise DataError(f"{self._data_path} is truncated: row {row} ({key}) ends past the end of the file; "
                            "write the store again with tools/convert_labels.py")
        return np.frombuffer(data, dtype).reshape(self._stored_shape)

    def signature(self):
        """(size, mtime_ns) of the store as a whole: labels.npy's size and the later modification time of
        labels.npy and index.json. Unchanged, with the same sample list, nothing needs a stat or a read."""
        data, index = os.stat(self._data_path), os.stat(os.path.join(self.root, PACKED_INDEX))
        return data.st_size, max(data.st_mtime_ns, index.st_mtime_ns)

    def stat(self, keys):
        """Every present map has the row size and the store's signature time: rewriting labels.npy or
        index.json re-checks all of them."""
        rows = self.rows(keys)
        row_bytes = self._rows_file()[3]
        present = rows >= 0
        return np.where(present, row_bytes, -1), np.where(present, self.signature()[1], -1)

    def validate(self, keys, images=None):
        """The rows of ``keys`` read in file order and checked together."""
        rows = self.rows(keys)
        if keys:
            self._check_shape(self._stored_shape, keys[0], images[0] if images is not None else None)
        order = np.argsort(rows)
        top = np.zeros(len(keys), np.int32)
        self._rows_file()       # the header checked, and a bad file named, before numpy maps it
        # a map of its own, unmapped on return: the start-up check reads the whole file, and a map kept
        # open would keep every page it read in this process's RSS (6 GB for ImageNet's maps)
        mapped = np.load(self._data_path, mmap_mode="r", allow_pickle=False)
        top[order] = check_content(np.asarray(mapped[rows[order]]),
                                   lambda j: (self.path(keys[order[j]]),
                                              images[order[j]] if images is not None else None))
        return top


def list_label_keys(root, suffix):
    """Sorted store keys ('<class_dir>/<stem>') of every ``suffix`` file below ``root``."""
    if not os.path.isdir(root):
        raise DataError(f"label-map folder not found: {root}")
    keys = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        rel = os.path.relpath(directory, root)
        for name in files:
            if name.endswith(suffix) and not name.startswith("."):
                keys.append(label_key(os.path.normpath(os.path.join(rel, name))))
    return sorted(keys)


def _progress(iterable, total, desc):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="map", dynamic_ncols=True, mininterval=1.0)


def pack_label_maps(store, out_dir, keys=None, dtype=None, progress=True):
    """Write every map of ``store`` (or of ``keys``) into ``out_dir/labels.npy`` + ``index.json``.

    ``dtype`` None keeps the dtype of the first map (float16 for the published sets). Both files are written under temporary names and renamed into place, the index last, so a
    crash never leaves a store that looks complete. Returns (number of maps, shape of one map).
    """
    keys = sorted(store.keys() if keys is None else keys)
    if not keys:
        raise DataError(f"no label maps found in {store.root}")
    os.makedirs(out_dir, exist_ok=True)
    first = store.load(keys[0], dtype=None)
    shape = tuple(first.shape)
    dtype = first.dtype if dtype is None else dtype
    with atomic_path(os.path.join(out_dir, PACKED_DATA)) as tmp_data:
        out = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.dtype(dtype), shape=(len(keys),) + shape)
        rows = enumerate(keys)
        for row, key in (_progress(rows, len(keys), "pack") if progress else rows):
            array = first if row == 0 else store.load(key, dtype=None)
            if tuple(array.shape) != shape:
                raise DataError(f"label map {store.path(key)} has shape {tuple(array.shape)}, "
                                f"the first one ({store.path(keys[0])}) has {shape}; all maps must match")
            out[row] = array
        out.flush()
        del out
    # the index goes into place last: an index always describes a complete data file
    write_text(os.path.join(out_dir, PACKED_INDEX), json.dumps(
        {"format": PACKED_FORMAT, "version": 1, "coverage": store.coverage, "shape": list(shape),
         "dtype": np.dtype(dtype).name, "keys": keys}))
    return len(keys), shape


def write_npy_tree(store, out_dir, keys=None, progress=True):
    """Write every map of ``store`` as ``out_dir/<key>.npy`` keeping its stored dtype (float16 stays
    float16). Each file is written to a temporary name and renamed. Returns the number written."""
    keys = sorted(store.keys() if keys is None else keys)
    it = _progress(keys, len(keys), "npy") if progress else keys
    for key in it:
        array = store.load(key, dtype=None)
        if array.dtype not in (np.float16, np.float32):
            array = array.astype(np.float32)
        with atomic_path(os.path.join(out_dir, key + ".npy")) as tmp:
            np.save(tmp, array)
    return len(keys)
