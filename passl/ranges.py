"""Valid ranges of numeric config keys, declared once, where the key is defined.

A registered callable (model, loss, optimizer, schedule, transform, dataset, label store) states the
range of a numeric keyword argument in its annotation, and ``passl.config.DEFAULTS`` states those of
the top-level keys with :class:`Range` itself::

    def __init__(self, prob: Probability = 0.5, max_count: PositiveInt = 1,
                 min_area: ranged(float, 0, 1, low_open=True) = 0.02): ...
    "epochs": Range(1, kind=int, default=300),

``passl.config.load_config`` checks every value against its range before anything is built, and
``Registry.build`` checks again for objects built from code; the error names the key, the value,
the range and where the value came from. A list-valued key (``scale: [0.08, 1.0]``) is ranged item by
item, optionally with a fixed length and in ascending order.
"""
import math
import typing

__all__ = ["Range", "ranged", "declared_range", "PositiveInt", "NonNegativeInt", "PositiveFloat",
           "NonNegativeFloat", "Probability", "DropRate"]


class Range:
    """Numbers from ``low`` to ``high`` (None: unbounded), each end included unless ``low_open`` /
    ``high_open``. ``kind``: int or float. ``items``: the value is a list of such numbers, of
    ``length`` items (None: any length >= 1), ``ascending`` if asked. ``note`` explains special values
    (e.g. "0: no scaling"). ``default``: the value when a config leaves the key out (DEFAULTS only)."""

    def __init__(self, low=None, high=None, *, kind=float, low_open=False, high_open=False, items=False,
                 length=None, ascending=False, note="", default=None):
        self.low, self.high, self.kind = low, high, kind
        self.low_open, self.high_open = low_open, high_open
        self.items, self.length, self.ascending = items, length, ascending
        self.note, self.default = note, default

    def _number_ok(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return self.high is None or not (value > self.high or self.high_open and value == self.high)

    def contains(self, value):
        """Whether ``value`` (a number, or a list of numbers when ``items``) is in range."""
        if not self.items:
            return self._number_ok(value)
        if not isinstance(value, (list, tuple)) or not value:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        if not all(self._number_ok(v) for v in value):
            return False
        return not self.ascending or all(a <= b for a, b in zip(value, value[1:]))

    def _bounds(self):
        low = None if self.low is None else f"{'(' if self.low_open else '['}{self.low}"
        high = None if self.high is None else f"{self.high}{')' if self.high_open else ']'}"
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if high:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "finite"

    def describe(self):
        """What the range admits, e.g. 'an integer >= 1', 'a list of 2 numbers in (0, 1], ascending'."""
        noun = "integer" if self.kind is int else "number"
        if self.items:
            count = f"{self.length} " if self.length else ""
            text = f"a list of {count}{noun}s, each {self._bounds()}{', ascending' if self.ascending else ''}"
        else:
            text = f"{'an' if noun == 'integer' else 'a'} {noun} {self._bounds()}"
        return f"{text} ({self.note})" if self.note else text

    def __repr__(self):
        return f"Range({self.describe()})"


def ranged(base, low=None, high=None, **options):
    """The annotation of a keyword argument ranged as ``Range(low, high, **options)``: ``base`` int or
    float for a number, list for a list of numbers (``options['kind']``, float by default, per item)."""
    if base is list:
        options.setdefault("kind", float)
        return typing.Annotated[list, Range(low, high, items=True, **options)]
    return typing.Annotated[base, Range(low, high, kind=base, **options)]


def declared_range(annotation):
    """The Range in an annotation made by :func:`ranged` (or an alias below), else None."""
    if typing.get_origin(annotation) is typing.Annotated:
        return next((m for m in typing.get_args(annotation)[1:] if isinstance(m, Range)), None)
    return None


PositiveInt = ranged(int, 1)
NonNegativeInt = ranged(int, 0)
PositiveFloat = ranged(float, 0, low_open=True)
NonNegativeFloat = ranged(float, 0)
Probability = ranged(float, 0, 1)
DropRate = ranged(float, 0, 1, high_open=True)     # a rate of 1 would drop everything (and divide by 0)
