"""Fixtures for the trainer tests: tiny synthetic images (helpers in engine_helpers.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_helpers import make_image_folder  # noqa: E402


@pytest.fixture
def image_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    return (make_image_folder(base / "train", per_class=4), make_image_folder(base / "val", per_class=3, seed=1))
