"""Files that run code when unpickled carelessly are refused, with an error naming the file and what
it met, by every tool that reads their format; the marker file their payload would create never
appears. Tools run through their main(), as the command line runs them."""
import os
import pathlib
import pickle
import shutil
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))
from crafted import (LEGACY_POSITIONS, EvalPayload, Payload, contiguous, object_npy, write_legacy,  # noqa: E402
                     write_zip)
from engine_helpers import make_image_folder, tiny_config  # noqa: E402

from passl.errors import PasslError  # noqa: E402

pytestmark = pytest.mark.slow


def _tensor():
    return contiguous("0", np.ones(3, np.float32))


def _weights_file(kind, directory, marker):
    """A hostile weights file of ``kind`` in ``directory``; returns its path."""
    payload = Payload(marker)
    if kind == "pth_zip":
        return write_zip(directory / "evil.pth", payload)
    if kind == "pth_zip_nested":
        return write_zip(directory / "evil.pth.tar", {"state_dict": {"w": _tensor(), "evil": payload}, "epoch": 3})
    if kind.startswith("pth_legacy_"):
        position = kind[len("pth_legacy_"):]
        return write_legacy(directory / "evil.pth", {"state_dict": {"w": _tensor()}},
                            replace={position: pickle.dumps(payload, protocol=2)})
    if kind == "paddle_top":
        path = directory / "evil.pdparams"
        path.write_bytes(pickle.dumps(payload, protocol=4))
        return str(path)
    if kind == "paddle_nested":
        path = str(directory / "evil.pdckpt")
        paddle.save({"model": {"cls_token": paddle.ones([1, 1, 32]), "evil": payload}, "epoch": 1}, path)
        return path
    if kind == "paddle_eval":
        path = str(directory / "evil.pdparams")
        paddle.save({"w": paddle.ones([2]), "x": EvalPayload(marker)}, path)
        return path
    if kind == "passl":
        path = directory / "epoch_300.pd"
        path.write_bytes(pickle.dumps({"epoch": 300, "state_dict": {"backbone.w": np.ones(2), "backbone.x": payload},
                                       "optimizer": {}, "lr_scheduler": {}}, protocol=4))
        return str(path)
    raise AssertionError(kind)


WEIGHT_KINDS = ["pth_zip", "pth_zip_nested"] + [f"pth_legacy_{p}" for p in LEGACY_POSITIONS] + \
    ["paddle_top", "paddle_nested", "paddle_eval", "passl"]

WEIGHT_TOOLS = {
    "convert_weights": lambda f, s: ("convert_weights", ["--src", f, "--dst", str(s["tmp"] / "out.pdparams")]),
    "train_evaluate": lambda f, s: ("train", ["-c", s["config"], "--load", f, "--evaluate-only"]),
    "train_load": lambda f, s: ("train", ["-c", s["config"], "--load", f]),
    "train_resume": lambda f, s: ("train", ["-c", s["config"], "--resume", f]),
    "export_model": lambda f, s: ("export_model", ["-c", s["config"], "--load", f, "--out", str(s["tmp"] / "export")]),
    "generate_lvvit": lambda f, s: ("generate_labels", ["--images", s["val"], "--out", str(s["tmp"] / "labels"),
                                                        "-c", s["config"], "--weights", f, "--no-progress"]),
    "generate_cnn": lambda f, s: ("generate_labels", ["--images", s["val"], "--out", str(s["tmp"] / "labels"),
                                                      "--arch", "small_cnn", "--num-classes", "3", "--width", "4",
                                                      "--weights", f, "--no-progress"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    train, val = make_image_folder(base / "train", per_class=2), make_image_folder(base / "val", per_class=1, seed=1)
    (base / "cfg").mkdir()
    return {"base": base, "train": train, "val": val,
            "config": tiny_config(base / "cfg", train, val, epochs=1, data__train__batch_size=2)}


def _run(tool, argv):
    import importlib
    module = importlib.import_module(f"tools.{tool}")
    return module.main(argv)


def _assert_refused(tool, argv, named, marker, words):
    """``tool`` stops with a PasslError whose message contains ``named`` and one of ``words``."""
    with pytest.raises(PasslError) as err:
        _run(tool, argv)
    message = str(err.value)
    assert named in message, message
    assert any(w in message for w in words), message
    assert not os.path.exists(marker), f"{tool} ran the payload"


@pytest.mark.parametrize("tool", list(WEIGHT_TOOLS))
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_weights_and_checkpoints(setup, tmp_path, kind, tool):
    marker = tmp_path / "ran"
    path = _weights_file(kind, tmp_path, marker)
    name, argv = WEIGHT_TOOLS[tool](path, {**setup, "tmp": tmp_path})
    _assert_refused(name, argv, path, marker, words=("refuses",))


# ---------------------------------------------------------------------------------------------
# label maps

LABEL_KINDS = ["pth_zip", "pth_zip_nested"] + [f"pth_legacy_{p}" for p in LEGACY_POSITIONS] + ["npy_objects"]


def _label_tree(kind, root, train_root, marker):
    """A label-map tree for every image of ``train_root``, each map the hostile file of ``kind``."""
    suffix = ".npy" if kind == "npy_objects" else ".pth"
    os.makedirs(root, exist_ok=True)
    one = os.path.join(root, "one" + suffix)
    if kind == "npy_objects":
        object_npy(one, marker)
    elif kind == "pth_zip_nested":
        write_zip(one, {"label": Payload(marker)})
    else:
        _weights_file(kind, pathlib.Path(root), marker)
        shutil.move(os.path.join(root, "evil.pth"), one)
    for directory, _, files in os.walk(train_root):
        for name in files:
            rel = os.path.relpath(os.path.join(directory, os.path.splitext(name)[0]), train_root)
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            shutil.copy(one, os.path.join(root, rel + suffix))
    os.remove(one)
    return "npy" if kind == "npy_objects" else "pth"


@pytest.mark.parametrize("tool", ["convert_labels", "convert_labels_packed", "train", "inspect_labels"])
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_label_maps(setup, tmp_path, kind, tool):
    marker = tmp_path / "ran"
    root = tmp_path / "maps"
    store = _label_tree(kind, str(root), setup["train"], marker)
    (tmp_path / "cfg").mkdir()
    config = tiny_config(tmp_path / "cfg", setup["train"], setup["val"], epochs=1,
                         data__train__label_store={"name": store, "root": str(root), "coverage": "full"})
    argv = {"convert_labels": ["--src", str(root), "--src-format", store, "--to", "npy", "--out", str(tmp_path / "o"),
                               "--no-progress"],
            "convert_labels_packed": ["--src", str(root), "--src-format", store, "--to", "packed",
                                      "--out", str(tmp_path / "o"), "--no-progress"],
            "train": ["-c", config],
            "inspect_labels": ["-c", config, "--index", "0", "--out", str(tmp_path / "s.npz")]}[tool]
    _assert_refused(tool.replace("_packed", ""), argv, str(root) + os.sep, marker, words=("refuses", "refused"))
