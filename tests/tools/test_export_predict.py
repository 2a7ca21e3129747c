"""tools/export_model.py and tools/predict.py: the static model matches the eager one, any batch size
and image size work, predictions are printed with class names, and a corrupt image is named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPORT = os.path.join(ROOT, "tools", "export_model.py")
PREDICT = os.path.join(ROOT, "tools", "predict.py")
CLASSES = ["ant", "bee", "cat"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _has_gpu():
    from passl.utils.distributed import cuda_available
    return cuda_available()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random LV-ViT (32 px, 3 classes) exported from a config with its own eval transforms."""
    import paddle

    import passl
    tmp = tmp_path_factory.mktemp("export")
    for name in CLASSES:
        os.makedirs(tmp / "val" / name)
        Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp / "val" / name / "a.png")
    model_cfg = {"name": "LVViT", "img_size": 32, "num_classes": 3, "embed_dim": 32, "depth": 2, "num_heads": 2,
                 "stem": "pe4_2"}
    cfg = {"model": model_cfg, "output_dir": str(tmp / "run"),
           "data": {"val": {"dataset": {"name": "ImageFolder", "root": str(tmp / "val")},
                            "transforms": [{"name": "ResizeShorter", "size": 32, "crop_pct": 0.8},
                                           {"name": "CenterCrop", "size": 32},
                                           {"name": "Normalize", "mean": MEAN, "std": STD}]}}}
    with open(tmp / "tiny.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    paddle.seed(3)
    model = passl.build_model(model_cfg)
    # BN statistics away from their defaults, so that eval mode matters
    for name, value in model.state_dict().items():
        if name.endswith("_mean") or name.endswith("_variance"):
            value.set_value(paddle.rand(value.shape) + (0.5 if name.endswith("_variance") else -0.5))
    paddle.save(model.state_dict(), str(tmp / "w.pdparams"))
    done = _run(EXPORT, "-c", str(tmp / "tiny.yaml"), "--load", str(tmp / "w.pdparams"), "--out", str(tmp / "out"))
    assert done.returncode == 0, done.stderr
    return tmp, model


def test_exported_matches_eager_for_any_batch_size(exported):
    import paddle

    from passl.export import load_exported
    tmp, model = exported
    model.eval()
    layer, info = load_exported(str(tmp / "out"))
    for batch in (1, 5, 2):                        # a new batch shape after others: a fresh set of kernels
        images = paddle.randn([batch, 3, 32, 32])
        np.testing.assert_allclose(layer(images.numpy()), model(images).numpy(), atol=1e-5, rtol=0)


def test_preprocess_json_records_the_config(exported):
    tmp, _ = exported
    with open(tmp / "out" / "preprocess.json") as f:
        info = json.load(f)
    assert info["resize_shorter"] == 40 and info["crop_size"] == 32 and info["crop_pct"] == 0.8
    assert info["mean"] == MEAN and info["std"] == STD
    assert info["class_names"] == CLASSES


def test_preprocess_image_is_resize_shorter_crop_normalise(exported, tmp_path):
    """Independent numpy/PIL reference: shorter side 40 bicubic, centre 32x32, (x/255 - mean)/std."""
    from passl.export import preprocess_image
    tmp, _ = exported
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    with open(tmp / "out" / "preprocess.json") as f:
        info = json.load(f)
    got = preprocess_image(str(tmp_path / "x.png"), info)
    resized = np.asarray(Image.fromarray(pixels).resize((72, 40), Image.BICUBIC), np.float32)  # 90*40/50 = 72
    crop = resized[4:36, 20:52]
    want = ((crop / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_predict_prints_top_classes_and_names_a_corrupt_file(exported, tmp_path):
    import paddle

    from passl.export import preprocess_image
    tmp, model = exported
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 170, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 25, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    done = _run(PREDICT, "--model", str(tmp / "out"), "--precision", "fp32", str(tmp_path / "big.jpg"),
                str(tmp_path / "small.png"))
    assert done.returncode == 0, done.stderr
    assert "predicted 2 image(s)" in done.stderr and "(fp32)" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("big.jpg") and lines[4].endswith("small.png")
    # 3 classes -> 3 lines per image, each name once, the eager model's ranking and probabilities
    with open(tmp / "out" / "preprocess.json") as f:
        info = json.load(f)
    model.eval()
    image = paddle.to_tensor(preprocess_image(str(tmp_path / "big.jpg"), info)[None])
    probs = paddle.nn.functional.softmax(model(image), -1).numpy()[0]
    shown = [line.split() for line in lines[1:4]]
    assert [s[1] for s in shown] == [CLASSES[i] for i in np.argsort(-probs)]
    np.testing.assert_allclose([float(s[2].rstrip("%")) for s in shown], np.sort(probs)[::-1] * 100, atol=0.01)

    done = _run(PREDICT, "--model", str(tmp / "out"), str(tmp_path / "small.png"), str(tmp_path / "broken.jpg"))
    assert done.returncode == 2
    assert "small.png" in done.stdout                  # the good image is still predicted
    assert "broken.jpg" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(_has_gpu(), reason="checks the CPU's answer to fp16")
def test_predict_takes_a_precision_and_refuses_fp16_on_the_cpu(exported, tmp_path):
    tmp, _ = exported
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    done = _run(PREDICT, "--model", str(tmp / "out"), "--precision", "fp16", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "fp16 needs a GPU" in done.stderr and "--precision fp32" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    done = _run(PREDICT, "--model", str(tmp / "out"), "--precision", "int3", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "fp32" in done.stderr and "fp16" in done.stderr


def _summary_flag(config, name):
    """A boolean row of ``Config.summary()``."""
    for line in config.summary().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == name:
            return cells[1] == "true"
    raise AssertionError(f"no {name} in the summary")


def test_the_gpu_predictor_is_configured_with_memory_optimisation(exported):
    from passl.export import load_exported, model_files, predictor_config
    tmp, _ = exported
    graph, params = model_files(str(tmp / "out" / "inference"))
    assert _summary_flag(predictor_config(graph, params, "gpu:0", "fp16"), "memory_optim")
    assert not _summary_flag(predictor_config(graph, params, "cpu", memory_optim=False), "memory_optim")
    layer, info = load_exported(str(tmp / "out"), device="cpu")
    assert not layer.memory_optim and layer.precision == "fp32" and info["traced_on"] == "cpu"


def test_a_refused_memory_optimisation_falls_back_with_a_warning(exported, monkeypatch):
    """Where Paddle's predictor refuses memory optimisation for a graph, the model still runs, and says so."""
    import paddle

    import passl.export as export
    tmp, model = exported
    monkeypatch.setattr(export, "resolve_device", lambda device: ("gpu", "gpu:0"))
    made = []

    def config(graph, params, device, precision, threads, memory_optim):
        made.append(memory_optim)
        return predictor_config_cpu(graph, params, "cpu", "fp32", threads, memory_optim)
    predictor_config_cpu = export.predictor_config
    monkeypatch.setattr(export, "predictor_config", config)
    create = paddle.inference.create_predictor

    def refusing(cfg):
        if made[-1]:
            raise ValueError("(InvalidArgument) Not find predictor_id 0 and pass_name memory_optimize_pass")
        return create(cfg)
    monkeypatch.setattr(paddle.inference, "create_predictor", refusing)
    with pytest.warns(UserWarning, match="refused memory optimisation.*memory_optimize_pass"):
        layer = export.InferenceModel(str(tmp / "out" / "inference"))
    assert made == [True, False] and not layer.memory_optim
    model.eval()
    images = paddle.randn([2, 3, 32, 32])
    np.testing.assert_allclose(layer(images.numpy()), model(images).numpy(), atol=1e-5, rtol=0)


def test_a_gpu_export_is_refused_on_the_cpu(exported, tmp_path):
    import shutil

    from passl.errors import ConfigError
    from passl.export import load_exported
    tmp, _ = exported
    shutil.copytree(tmp / "out", tmp_path / "gpu")
    info = json.loads((tmp_path / "gpu" / "preprocess.json").read_text())
    (tmp_path / "gpu" / "preprocess.json").write_text(json.dumps({**info, "traced_on": "gpu"}))
    with pytest.raises(ConfigError, match="exported for the GPU.*--device cpu"):
        load_exported(str(tmp_path / "gpu"), device="cpu")
    del info["traced_on"]                       # a folder from before traced_on: traced on the CPU
    (tmp_path / "gpu" / "preprocess.json").write_text(json.dumps(info))
    assert load_exported(str(tmp_path / "gpu"), device="cpu")[0].device == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_export_and_predictor_match_eager(exported, tmp_path, precision):
    """Traced on the GPU (fused attention kernels in the graph), run by the GPU predictor in fp32 and fp16."""
    import paddle

    from passl.config import load_config
    from passl.export import export_model, load_exported
    tmp, model = exported
    cfg = load_config(str(tmp / "tiny.yaml"))
    previous = paddle.get_device()
    try:
        export_model(cfg, str(tmp / "w.pdparams"), str(tmp_path / "out"), device="gpu")
    finally:
        paddle.set_device(previous)
    layer, info = load_exported(str(tmp_path / "out"), device="gpu", precision=precision)
    assert info["traced_on"] == "gpu" and layer.memory_optim and layer.device.startswith("gpu")
    model.eval()
    images = paddle.randn([4, 3, 32, 32])
    want = model.to("cpu")(images.cpu()).numpy()
    got = layer(images.numpy())
    assert got.dtype == np.float32
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got, want, atol=tolerance * max(1.0, float(np.abs(want).max())), rtol=0)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    done = _run(PREDICT, "--model", str(tmp_path / "nothing"), str(tmp_path / "x.jpg"))
    assert done.returncode == 2 and "export_model" in done.stderr


def test_a_folder_without_the_graph_is_a_clear_error(exported, tmp_path):
    import shutil
    tmp, _ = exported
    shutil.copy(tmp / "out" / "preprocess.json", tmp_path / "preprocess.json")   # graph files left behind
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    done = _run(PREDICT, "--model", str(tmp_path), str(tmp_path / "x.png"))
    assert done.returncode == 2 and "inference.json" in done.stderr and "export_model" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_device_is_a_clear_error(exported, tmp_path):
    tmp, _ = exported
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    done = _run(PREDICT, "--model", str(tmp / "out"), "--device", "tpu", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "'tpu'" in done.stderr and "gpu:N" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(_has_gpu(), reason="asks for a GPU where none is visible")
def test_asking_for_a_missing_gpu_is_a_clear_error(exported, tmp_path):
    tmp, _ = exported
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    done = _run(PREDICT, "--model", str(tmp / "out"), "--device", "gpu", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "no GPU is visible" in done.stderr and "Traceback" not in done.stderr


def test_predict_preprocesses_exactly_as_evaluation(exported, tmp_path):
    """preprocess_image and the val dataset's batch (what the trainer evaluates) are the same numbers."""
    from passl.data import build_dataset, collate_fn
    from passl.data.loader import build_loader
    from passl.export import preprocess_image
    tmp, _ = exported
    with open(tmp / "out" / "preprocess.json") as f:
        info = json.load(f)
    assert info["transforms"] == [{"name": "ResizeShorter", "size": 32, "crop_pct": 0.8},
                                  {"name": "CenterCrop", "size": 32}, {"name": "Normalize", "mean": MEAN, "std": STD}]
    folder = tmp_path / "val" / "only"
    os.makedirs(folder)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (61, 47, 3), dtype=np.uint8)).save(folder / "x.png")
    with open(tmp / "tiny.yaml") as f:
        val = yaml.safe_load(f)["data"]["val"]
    dataset = build_dataset({**val, "dataset": {"name": "ImageFolder", "root": str(tmp_path / "val")}},
                            "val", 3, (2, 2), (32, 32))
    loader = build_loader(dataset, {"batch_size": 1, "num_workers": 0}, collate_fn, train=False)
    evaluated = next(iter(loader))["image"].numpy()[0]
    np.testing.assert_array_equal(preprocess_image(str(folder / "x.png"), info), evaluated)


def test_a_folder_exported_without_transforms_still_predicts(exported, tmp_path):
    from passl.export import preprocess_image
    tmp, _ = exported
    with open(tmp / "out" / "preprocess.json") as f:
        info = json.load(f)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    flat = {k: v for k, v in info.items() if k not in ("transforms", "input_size")}
    np.testing.assert_array_equal(preprocess_image(str(tmp_path / "x.png"), flat),
                                  preprocess_image(str(tmp_path / "x.png"), info))


def test_eval_preprocessing_takes_the_model_size_and_refuses_a_mismatch():
    from passl.errors import ConfigError
    from passl.export import eval_preprocessing
    cfg = {"model": {"name": "LVViT"}, "data": {"val": {"transforms": [
        {"name": "ResizeShorter", "crop_pct": 0.875}, {"name": "CenterCrop"}, {"name": "Normalize"},
        {"name": "RandomHorizontalFlip", "enable": False}]}}}
    info = eval_preprocessing(cfg, (48, 48))
    assert [t["name"] for t in info["transforms"]] == ["ResizeShorter", "CenterCrop", "Normalize"]   # enabled only
    assert (info["resize_shorter"], info["crop_size"], info["input_size"]) == (54, 48, [48, 48])
    cfg["data"]["val"]["transforms"][1] = {"name": "CenterCrop", "size": 40}
    with pytest.raises(ConfigError, match=r"into 40x40, but the model takes 48x48"):
        eval_preprocessing(cfg, (48, 48))
    cfg["data"]["val"]["transforms"] = [{"name": "ResizeShorter", "crop_pct": 1.0}, {"name": "Normalize"}]
    with pytest.raises(ConfigError, match="CenterCrop"):            # no crop: the output is not square
        eval_preprocessing(cfg, (48, 48))
