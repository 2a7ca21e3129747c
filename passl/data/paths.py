"""A table of many short strings (image paths) in two numpy arrays instead of a Python list.

At ImageNet scale a list of 1.28 M path strings costs ~150 MB of Python objects per process, and
every DataLoader worker forked from the trainer touches their reference counts as it reads them,
so the pages holding them are copied into each worker one by one: the worker's private memory
grows over an epoch. Two arrays (the UTF-8 bytes of every path, and where each one starts) are
two objects whose pages are only ever read, so they stay shared with the parent.
"""
import numpy as np

__all__ = ["PathTable", "SampleList"]

_SEPARATOR = "\0"   # cannot occur in a file name


class PathTable:
    """Read-only sequence of str. ``data``: uint8 [total bytes]; ``offsets``: int64 [n + 1],
    string i is ``data[offsets[i]:offsets[i + 1]]`` decoded as UTF-8 (surrogateescape, so any
    byte string a file system returns round-trips)."""

    def __init__(self, data, offsets):
        self.data = np.ascontiguousarray(data, np.uint8)
        self.offsets = np.ascontiguousarray(offsets, np.int64)

    @classmethod
    def from_strings(cls, strings):
        """A table of ``strings`` (any iterable of str)."""
        strings = list(strings)
        if not strings:
            return cls(np.zeros(0, np.uint8), np.zeros(1, np.int64))
        joined = np.frombuffer((_SEPARATOR.join(strings) + _SEPARATOR).encode("utf-8", "surrogateescape"),
                               np.uint8)
        ends = np.flatnonzero(joined == 0)
        offsets = np.concatenate([[0], ends + 1]).astype(np.int64)
        # drop the separators: string i spans [offsets[i], ends[i])
        keep = np.ones(joined.size, bool)
        keep[ends] = False
        data = joined[keep]
        return cls(data, offsets - np.arange(offsets.size))

    def __len__(self):
        return self.offsets.size - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"path index {index} out of range for {len(self)} paths")
        return self.data[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def strings(self, start, stop):
        """Strings ``start`` .. ``stop`` - 1 as a list (one decode for the whole range)."""
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        text = self.data[first:last].tobytes().decode("utf-8", "surrogateescape")
        if text.isascii():   # character positions are byte positions
            bounds = (self.offsets[start:stop + 1] - first).tolist()
            return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [self[i] for i in range(start, stop)]

    def __eq__(self, other):
        return (isinstance(other, PathTable) and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.data, other.data))

    @property
    def nbytes(self):
        return self.data.nbytes + self.offsets.nbytes


class SampleList:
    """``(relative path, class index)`` per sample, read from a PathTable and an int array."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.paths[index], int(self.labels[index])

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]
