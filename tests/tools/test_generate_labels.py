"""tools/generate_labels.py: dense label maps from CNN and LV-ViT annotators, checked against
independent computations; resume after an interruption; bad images; stores; sharding."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "generate_labels.py")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(root, sizes=((50, 40), (33, 61), (80, 64), (40, 40), (64, 20), (45, 45), (70, 30))):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        d = os.path.join(root, f"c{i % 3}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(d, f"img{i}.{'png' if i % 2 else 'jpg'}"))
    return root


@pytest.fixture
def small_cnn(tmp_path):
    import paddle

    from passl.annotate import SmallCNN
    paddle.seed(0)
    net = SmallCNN(num_classes=6, width=4)
    net.eval()
    path = str(tmp_path / "cnn.pdparams")
    paddle.save(net.state_dict(), path)
    return net, path


def _annotator(path):
    from passl.annotate import build_cnn_annotator
    return build_cnn_annotator("small_cnn", 6, path, width=4)


def _maps(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".npy") and not name.startswith("."):
                out[os.path.relpath(os.path.join(directory, name), root)] = np.load(os.path.join(directory, name))
    return out


def _reference_maps(net, path, k):
    """Top-k of the classifier as a 1x1 convolution over net.features, by numpy."""
    import paddle

    from passl.annotate import preprocess
    image = paddle.to_tensor(preprocess(path, (40, 32), MEAN, STD)[None])
    features = net.features(image).numpy()[0]                                    # [D, h, w]
    logits = np.einsum("dhw,dc->chw", features, net.fc.weight.numpy()) + net.fc.bias.numpy()[:, None, None]
    order = np.argsort(-logits, axis=0, kind="stable")[:k]
    return np.take_along_axis(logits, order, 0), order


def test_preprocess_resizes_the_whole_image_and_normalises(tmp_path):
    """Independent numpy/PIL reference: the whole image resized to W x H, then (x / 255 - mean) / std."""
    from passl.annotate import preprocess
    pixels = np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    for interpolation, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        got = preprocess(str(tmp_path / "x.png"), (40, 32), MEAN, STD, interpolation)
        resized = np.asarray(Image.fromarray(pixels).resize((40, 32), pil), np.float64)
        want = ((resized / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_maps_have_the_spec_layout_and_match_a_1x1_conv_reference(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps
    net, weights = small_cnn
    images = _folder(str(tmp_path / "images"))
    summary = generate_label_maps(_annotator(weights), images, str(tmp_path / "labels"), (40, 32), topk=3,
                                  batch_size=3, progress=False, log=lambda *a: None)
    maps = _maps(str(tmp_path / "labels"))
    assert summary["written"] == 7 and len(maps) == 7
    assert "c0/img0.npy" in maps and "c1/img1.npy" in maps     # key = relative path without extension
    for rel, label_map in maps.items():
        assert label_map.dtype == np.float16 and label_map.shape == (2, 3, 4, 5)   # 32x40 / stride 8
        stem = os.path.join(images, rel[:-4])
        source = stem + (".png" if os.path.exists(stem + ".png") else ".jpg")
        scores, classes = _reference_maps(net, source, 3)
        np.testing.assert_array_equal(label_map[1], classes.astype(np.float16))
        np.testing.assert_allclose(label_map[0].astype(np.float32), scores, rtol=2e-3, atol=2e-3)


def test_resumed_run_writes_the_same_maps_as_an_uninterrupted_one(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps
    _, weights = small_cnn
    images = _folder(str(tmp_path / "images"))
    quiet = dict(topk=3, batch_size=2, progress=False, log=lambda *a: None)
    generate_label_maps(_annotator(weights), images, str(tmp_path / "once"), (40, 32), **quiet)
    # interrupted: 3 maps written, then a crash left a temporary file behind
    resumed = str(tmp_path / "resumed")
    first = generate_label_maps(_annotator(weights), images, resumed, (40, 32), max_images=3, **quiet)
    assert first["written"] == 3 and not first["complete"] and len(_maps(resumed)) == 3
    os.makedirs(os.path.join(resumed, "c2"), exist_ok=True)
    with open(os.path.join(resumed, "c2", ".img2.npy.tmp999"), "wb") as f:
        f.write(b"half a file")
    second = generate_label_maps(_annotator(weights), images, resumed, (40, 32), **quiet)
    assert second["existing"] == 3 and second["written"] == 4 and second["complete"]
    once, again = _maps(str(tmp_path / "once")), _maps(resumed)
    assert sorted(once) == sorted(again)
    for key in once:
        np.testing.assert_array_equal(once[key], again[key])
    # the label store sees exactly the 7 maps (the leftover temporary file is not a map)
    from passl.data.label_maps import NpyLabelStore
    assert len(NpyLabelStore(resumed, coverage="full").keys()) == 7


def test_ranks_share_the_images_and_together_write_everything(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps, shard
    assert shard(list(range(7)), 0, 2) == [0, 2, 4, 6] and shard(list(range(7)), 1, 2) == [1, 3, 5]
    _, weights = small_cnn
    images = _folder(str(tmp_path / "images"))
    quiet = dict(topk=3, batch_size=4, progress=False, log=lambda *a: None)
    counts = [generate_label_maps(_annotator(weights), images, str(tmp_path / "split"), (40, 32), rank=r,
                                  world_size=2, **quiet)["written"] for r in (0, 1)]
    assert counts == [4, 3]
    generate_label_maps(_annotator(weights), images, str(tmp_path / "one"), (40, 32), **quiet)
    one, split = _maps(str(tmp_path / "one")), _maps(str(tmp_path / "split"))
    assert sorted(one) == sorted(split)
    for key in one:
        np.testing.assert_array_equal(one[key], split[key])


def test_undecodable_image_is_named_and_skipped_only_when_asked(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps
    from passl.errors import DataError
    _, weights = small_cnn
    images = _folder(str(tmp_path / "images"))
    bad = os.path.join(images, "c1", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff not an image")
    quiet = dict(topk=3, batch_size=4, progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match="broken.jpg"):
        generate_label_maps(_annotator(weights), images, str(tmp_path / "a"), (40, 32), **quiet)
    lines = []
    summary = generate_label_maps(_annotator(weights), images, str(tmp_path / "b"), (40, 32), skip_bad_images=True,
                                  topk=3, batch_size=4, progress=False, log=lines.append)
    assert summary["bad_images"] == [bad] and summary["written"] == 7 and summary["complete"]
    assert any("skipped 1 undecodable" in line and "broken.jpg" in line for line in lines)


def _tool(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)


def test_cli_packed_store_and_bad_image_exit(tmp_path, small_cnn):
    from passl.data.label_maps import NpyLabelStore, PackedLabelStore
    _, weights = small_cnn
    images = _folder(str(tmp_path / "images"))
    common = ["--images", images, "--arch", "small_cnn", "--num-classes", "6", "--width", "4", "--weights", weights,
              "--image-size", "40", "32", "--topk", "3", "--no-progress"]
    done = _tool(*common, "--out", str(tmp_path / "npy"))
    assert done.returncode == 0, done.stderr
    done = _tool(*common, "--out", str(tmp_path / "packed"), "--store", "packed")
    assert done.returncode == 0, done.stderr
    npy, packed = NpyLabelStore(str(tmp_path / "npy"), coverage="full"), PackedLabelStore(str(tmp_path / "packed"))
    assert packed.coverage == "full" and packed.keys() == npy.keys() and len(npy.keys()) == 7
    for key in npy.keys():
        np.testing.assert_array_equal(packed.load(key, dtype=None), npy.load(key, dtype=None))
    with open(os.path.join(images, "c0", "zz_bad.png"), "wb") as f:
        f.write(b"garbage")
    done = _tool(*common, "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "zz_bad.png" in done.stderr and "--skip-bad-images" in done.stderr
    assert "Traceback" not in done.stderr
    done = _tool(*common, "--out", str(tmp_path / "bad"), "--skip-bad-images")
    assert done.returncode == 0 and "zz_bad.png" in done.stdout


def test_resnet_annotator_holds_all_logits_whose_mean_is_the_classifier_output(tmp_path):
    """With K = C the map keeps every logit; average pooling then the fc equals the fc then the mean."""
    import paddle

    from passl.annotate import CNNAnnotator, build_cnn, topk_label_maps
    paddle.seed(1)
    net = build_cnn("resnet18", num_classes=4)
    annotator = CNNAnnotator(net, "resnet18")
    images = paddle.randn([2, 3, 96, 64])
    maps = topk_label_maps(annotator(images), k=4)                 # [2, 2, 4, 3, 2]
    assert maps.shape == (2, 2, 4, 3, 2)
    full = np.zeros((2, 4, 3, 2), np.float32)
    np.put_along_axis(full, maps[:, 1].astype(np.int64), maps[:, 0].astype(np.float32), axis=1)
    np.testing.assert_allclose(full.mean((2, 3)), net(images).numpy(), rtol=1e-2, atol=1e-2)


def test_lvvit_annotator_is_the_aux_head_on_each_token(tmp_path):
    import paddle

    import passl
    from passl.annotate import build_lvvit_annotator, topk_label_maps
    cfg = {"name": "LVViT", "img_size": 32, "num_classes": 5, "embed_dim": 32, "depth": 2, "num_heads": 2,
           "stem": "patch16"}
    paddle.seed(2)
    model = passl.build_model(cfg)
    paddle.save(model.state_dict(), str(tmp_path / "v.pdparams"))
    annotator = build_lvvit_annotator(cfg, str(tmp_path / "v.pdparams"))
    images = paddle.randn([3, 3, 32, 32])
    maps = topk_label_maps(annotator(images), k=2)                 # [3, 2, 2, 2, 2]
    model.eval()
    tokens = model.forward_dense_maps(images, apply_norm=True)[0]   # [3, 32, 2, 2]
    aux = np.einsum("bdhw,dc->bchw", tokens.numpy(), model.aux_head.weight.numpy()) \
        + model.aux_head.bias.numpy()[:, None, None]
    order = np.argsort(-aux, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(maps[:, 1], order.astype(np.float16))
    np.testing.assert_allclose(maps[:, 0].astype(np.float32), np.take_along_axis(aux, order, 1), rtol=2e-3, atol=2e-3)


def test_a_finished_run_rerun_keeps_its_record_and_other_settings_are_refused(tmp_path, small_cnn):
    import json

    from passl.annotate import generate_label_maps
    from passl.errors import DataError
    _, weights = small_cnn
    images, out = _folder(str(tmp_path / "images")), str(tmp_path / "labels")
    quiet = dict(batch_size=4, progress=False, log=lambda *a: None)
    generate_label_maps(_annotator(weights), images, out, (40, 32), topk=3, **quiet)
    again = generate_label_maps(_annotator(weights), images, out, (40, 32), topk=3, **quiet)
    assert again["written"] == 0 and again["existing"] == 7 and again["map_shape"] == [2, 3, 4, 5]
    with open(os.path.join(out, "label_maps.json")) as f:
        assert json.load(f)["map_shape"] == [2, 3, 4, 5]
    before = _maps(out)
    with pytest.raises(DataError, match="image_size \\[40, 32\\] != \\[48, 32\\].*another --out"):
        generate_label_maps(_annotator(weights), images, out, (48, 32), topk=3, **quiet)
    with pytest.raises(DataError, match="topk 3 != 2"):
        generate_label_maps(_annotator(weights), images, out, (40, 32), topk=2, **quiet)
    after = _maps(out)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = {tool!r}
import passl.annotate.generate as generate
written, write = [0], generate._write_atomic

def write_then_die(path, label_map):   # the process is killed (SIGKILL: nothing runs after) after 2 maps
    write(path, label_map)
    written[0] += 1
    if written[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)

generate._write_atomic = write_then_die
sys.path.insert(0, os.path.join({root!r}, "tools"))
import generate_labels
from passl.utils import cli
cli.run(generate_labels.main, sys.argv[1:])
"""


def _files(root):
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                out[os.path.relpath(os.path.join(directory, name), root)] = f.read()
    return out


@pytest.mark.slow
def test_a_killed_run_records_its_annotator_and_a_rerun_with_another_is_refused(tmp_path, small_cnn):
    import json

    import paddle

    from passl.annotate import SmallCNN
    from passl.utils.fileio import sha256_file
    _, weights = small_cnn
    paddle.seed(7)
    other = str(tmp_path / "other.pdparams")
    paddle.save(SmallCNN(num_classes=6, width=4).state_dict(), other)
    images, out = _folder(str(tmp_path / "images")), str(tmp_path / "labels")
    common = ["--images", images, "--out", out, "--arch", "small_cnn", "--num-classes", "6", "--width", "4",
              "--image-size", "40", "32", "--topk", "3", "--batch-size", "1", "--no-progress"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(root=ROOT, tool=TOOL))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    killed = subprocess.run([sys.executable, str(script), *common, "--weights", weights], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    with open(os.path.join(out, "label_maps.json")) as f:
        record = json.load(f)
    assert record["annotator"] == {"kind": "cnn", "arch": "small_cnn", "num_classes": 6, "width": 4,
                                   "weights_sha256": sha256_file(weights)}
    assert record["interpolation"] == "bilinear" and record["weights"] == os.path.abspath(weights)
    before = _files(out)
    assert len([name for name in before if name.endswith(".npy")]) == 2
    for change, words in ((["--weights", other], "annotator.weights_sha256"),
                          (["--weights", weights, "--interpolation", "bicubic"], "interpolation bilinear != bicubic"),
                          (["--weights", weights, "--mean", "0.5", "0.5", "0.5"], "mean [0.485, 0.456, 0.406] != [0.5, 0.5, 0.5]")):
        done = _tool(*common, *change)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {os.path.join(out, 'label_maps.json')}: the maps already in {out} "
                                      "were made by another annotator or with other settings (")
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert _files(out) == before                       # nothing written, nothing removed
    done = _tool(*common, "--weights", weights)            # the same annotator completes the run
    assert done.returncode == 0, done.stderr
    assert "wrote 5, kept 2 already there" in done.stdout
    once = str(tmp_path / "once")
    assert _tool(*[a if a != out else once for a in common], "--weights", weights).returncode == 0
    assert _maps(once).keys() == _maps(out).keys()
    assert all(np.array_equal(_maps(once)[k], _maps(out)[k]) for k in _maps(once))


def test_maps_of_unknown_origin_are_not_completed(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps
    from passl.errors import DataError
    _, weights = small_cnn
    images, out = _folder(str(tmp_path / "images")), tmp_path / "labels"
    (out / "c0").mkdir(parents=True)
    np.save(out / "c0" / "img0.npy", np.zeros((2, 3, 4, 5), np.float16))     # e.g. a published set, no record
    with pytest.raises(DataError, match="holds 1 label map\\(s\\) but no label_maps.json"):
        generate_label_maps(_annotator(weights), images, str(out), (40, 32), topk=3, progress=False,
                            log=lambda *a: None)
    assert os.listdir(out / "c0") == ["img0.npy"]


def test_temporaries_of_a_killed_write_are_removed_by_the_rank_that_owns_the_map(tmp_path, small_cnn):
    from passl.annotate import generate_label_maps
    _, weights = small_cnn
    images, out = _folder(str(tmp_path / "images")), tmp_path / "labels"
    (out / "c2").mkdir(parents=True)
    (out / "c2" / ".img2.npy.k3j_x9q0.tmp.npy").write_bytes(b"half a map")   # atomic_path's naming
    (out / "c2" / ".notes.txt").write_bytes(b"not ours")
    quiet = dict(topk=3, batch_size=4, progress=False, log=lambda *a: None)
    # sorted keys c0/img0, c0/img3, c0/img6, c1/img1, c1/img4, c2/img2, c2/img5: c2/img2 is rank 1's
    generate_label_maps(_annotator(weights), images, str(out), (40, 32), rank=0, world_size=2, **quiet)
    assert (out / "c2" / ".img2.npy.k3j_x9q0.tmp.npy").exists()      # rank 1 may be writing it: left alone
    generate_label_maps(_annotator(weights), images, str(out), (40, 32), rank=1, world_size=2, **quiet)
    assert sorted(os.listdir(out / "c2")) == [".notes.txt", "img2.npy", "img5.npy"]
