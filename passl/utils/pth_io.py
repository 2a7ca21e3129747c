"""Moved to :mod:`passl.io.pth`; these names stay importable from here for existing code."""
from passl.io.pth import load_pth, save_pth  # noqa: F401

__all__ = ["load_pth", "save_pth"]
