"""The one way weights get into a model (passl.models.load_pretrained) reads every format, picks the
right weights out of each kind of checkpoint, and says what is wrong when keys differ by a prefix."""
import collections
import os
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from lvvit_reference import reference_state_dict  # noqa: E402

from passl.errors import CheckpointError  # noqa: E402
from passl.io import safetensors_metadata, save_pth, write_safetensors  # noqa: E402
from passl.models import load_pretrained  # noqa: E402
from passl.models.convert import weights_metadata  # noqa: E402
from passl.models.lvvit import LVViT  # noqa: E402

SHAPE = dict(dim=32, depth=1, num_classes=5, width=None, grid=2)


def _model():
    return LVViT(img_size=32, embed_dim=32, depth=1, num_heads=4, num_classes=5, stem="patch16")


def _paddle_layout(torch_weights):
    """The reference weights in Paddle's layout, derived here: Linear weights transposed."""
    return collections.OrderedDict((k, v.T.copy() if k.endswith(".weight") and v.ndim == 2 else v)
                                   for k, v in torch_weights.items())


@pytest.fixture
def weights():
    return _paddle_layout(reference_state_dict(np.random.default_rng(0), **SHAPE))


def _assert_holds(model, expected):
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), value, err_msg=key)


def test_every_format_loads_the_same_weights(tmp_path, weights):
    torch_layout = reference_state_dict(np.random.default_rng(0), **SHAPE)
    files = {"pdparams": str(tmp_path / "w.pdparams"), "safetensors": str(tmp_path / "w.safetensors"),
             "safetensors_torch": str(tmp_path / "model.safetensors"),
             "pth": str(tmp_path / "w.pth.tar"), "passl": str(tmp_path / "epoch_300.pd")}
    paddle.save({k: paddle.to_tensor(v) for k, v in weights.items()}, files["pdparams"])
    write_safetensors(weights, files["safetensors"], weights_metadata(weights))     # as this project writes it
    write_safetensors(torch_layout, files["safetensors_torch"], {"format": "pt"})     # as timm / the hub write it
    save_pth({"state_dict": {"module." + k: v for k, v in torch_layout.items()}}, files["pth"])
    import pickle
    with open(files["passl"], "wb") as f:
        pickle.dump({"epoch": 300, "state_dict": {"backbone." + k: v for k, v in weights.items()},
                     "optimizer": {}, "lr_scheduler": {"last_epoch": 299}}, f, protocol=4)
    for name, path in files.items():
        model = _model()
        report = load_pretrained(model, path, log=lambda m: None)
        assert report["loaded"] == len(weights), name
        assert report["which"] == ("weights" if name.startswith(("pdparams", "safetensors")) else "model"), name
        _assert_holds(model, weights)


def test_a_trainer_checkpoint_gives_its_best_weights(tmp_path, weights):
    ema = collections.OrderedDict((k, v + 1) for k, v in weights.items())
    path = str(tmp_path / "best.pdckpt")
    to_paddle = lambda sd: collections.OrderedDict((k, paddle.to_tensor(v)) for k, v in sd.items())  # noqa: E731
    paddle.save({"model": to_paddle(weights), "ema": to_paddle(ema), "epoch": 2,
                 "best": {"top1": 50.0, "which": "ema", "epoch": 2}, "rng": {"paddle": paddle.get_rng_state()}}, path)
    model = _model()
    assert load_pretrained(model, path, log=lambda m: None)["which"] == "ema"
    _assert_holds(model, ema)
    paddle.save({"model": to_paddle(weights), "ema": to_paddle(ema), "epoch": 2,
                 "best": {"top1": 50.0, "which": "model", "epoch": 2}}, path)
    model = _model()
    assert load_pretrained(model, path, log=lambda m: None)["which"] == "model"
    _assert_holds(model, weights)
    assert load_pretrained(model, path, ema=True, log=lambda m: None)["which"] == "ema"
    _assert_holds(model, ema)


@pytest.mark.parametrize("side", ["file", "model"])
def test_keys_that_differ_only_by_a_prefix_are_named(tmp_path, weights, side):
    path = str(tmp_path / "w.safetensors")
    model = _model()
    if side == "file":
        write_safetensors({"encoder." + k: v for k, v in weights.items()}, path)
        says = "every key in the file is a model key with 'encoder.' in front"
    else:
        write_safetensors({k: v for k, v in weights.items() if k.startswith("blocks.0.")}, path)
        model = _model().blocks[0]
        write_safetensors({k[len("blocks.0."):]: v for k, v in weights.items() if k.startswith("blocks.0.")}, path)
        wrapper = paddle.nn.Sequential()
        wrapper.add_sublayer("inner", model)
        model, says = wrapper, "every model key is a key of the file with 'inner.' in front"
    with pytest.raises(CheckpointError, match=says):
        load_pretrained(model, path, log=lambda m: None)


def test_an_unrelated_mismatch_gets_no_prefix_hint(tmp_path, weights):
    broken = dict(weights)
    broken["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(_model(), broken, log=lambda m: None)
    assert "in front" not in str(err.value) and "extra.weight" in str(err.value)


def test_convert_tool_writes_safetensors_with_variant_and_img_size(tmp_path, weights, capsys):
    from tools.convert_weights import main
    torch_layout = reference_state_dict(np.random.default_rng(0), **SHAPE)
    src = str(tmp_path / "w.pth")
    save_pth(torch_layout, src)
    dst = str(tmp_path / "w.safetensors")
    assert main(["--src", src, "--dst", dst, "--img-size", "64"]) == 0
    meta = safetensors_metadata(dst)
    assert meta["variant"] == "custom" and meta["img_size"] == "64" and meta["num_classes"] == "5"
    model = LVViT(img_size=64, embed_dim=32, depth=1, num_heads=4, num_classes=5, stem="patch16")
    assert load_pretrained(model, dst, log=lambda m: None)["pos_embed_resized"] is None
    np.testing.assert_array_equal(model.head.weight.numpy(), weights["head.weight"])
    assert "converted" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=".pdparams or .safetensors"):
        main(["--src", src, "--dst", str(tmp_path / "w.pt")])


def test_cnn_annotator_reads_safetensors_and_trainer_checkpoints(tmp_path):
    from passl.annotate import SmallCNN, build_cnn_annotator
    paddle.seed(0)
    net = SmallCNN(num_classes=3, width=4)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    write_safetensors(state, str(tmp_path / "cnn.safetensors"))
    # what the trainer writes for the cnn_classifier model: keys under "net.", the EMA as best weights
    paddle.save({"model": {"net." + k: paddle.zeros_like(v) for k, v in net.state_dict().items()},
                 "ema": {"net." + k: v for k, v in net.state_dict().items()}, "best": {"which": "ema"}},
                str(tmp_path / "cnn.pdckpt"))
    for name in ("cnn.safetensors", "cnn.pdckpt"):
        annotator = build_cnn_annotator("small_cnn", 3, str(tmp_path / name), width=4)
        for key, value in annotator.net.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), state[key], err_msg=f"{name}: {key}")


def test_bfloat16_weights_saved_by_paddle_load_as_their_values(tmp_path, weights):
    """paddle.save writes a bfloat16 tensor as numpy uint16 (its bits), which Paddle takes back as bfloat16;
    the restricted reader keeps the uint16 and loading must not read the bits as integers."""
    path = str(tmp_path / "bf16.pdparams")
    paddle.save({k: paddle.to_tensor(v).astype("bfloat16") for k, v in weights.items()}, path)
    model = _model()
    load_pretrained(model, path, log=lambda m: None)
    for key, value in weights.items():     # bfloat16 keeps 8 significant bits
        np.testing.assert_allclose(model.state_dict()[key].numpy(), value, rtol=2 ** -8, atol=1e-30, err_msg=key)
