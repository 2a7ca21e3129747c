"""Static inference models: export an LV-ViT with its eval preprocessing, and predict with it.

``export_model`` writes, into ``out_dir``:

- ``inference.json`` / ``.pdmodel`` + ``inference.pdiparams``: ``paddle.jit.save`` of the eval model,
  input ``[None, 3, H, W]`` float32 (any batch size), output ``[B, num_classes]`` logits;
- ``preprocess.json``: what ``predict`` does to an image first (SPEC 5 evaluation: resize the
  shorter side to int(crop / crop_pct) bicubic, centre-crop, normalise), and the class names.

``predict`` runs that folder with Paddle Inference (``InferenceModel``: oneDNN kernels and fused
passes on the CPU, the GPU where Paddle has CUDA and one is visible) and returns the top-5 classes of
images of any size (JPEG, PNG, ... anything PIL decodes). On a 2-core CPU the predictor ran lvvit_t
at 63-65 images/s where the eager model ran 26-36 and ``paddle.jit.load`` 26-29 (benchmarks/bench_eval.py).
"""
import json
import os

import numpy as np

from passl.errors import ConfigError, DataError
from passl.utils.fileio import write_text

__all__ = ["export_model", "eval_preprocessing", "load_exported", "InferenceModel", "preprocess_image", "predict",
           "PREPROCESS_FILE", "MODEL_PREFIX"]

PREPROCESS_FILE = "preprocess.json"
MODEL_PREFIX = "inference"


def eval_preprocessing(cfg):
    """The eval preprocessing of a resolved config as a dict: {resize_shorter, crop_pct, crop_size,
    interpolation, mean, std} from data.val.transforms (ResizeShorter, CenterCrop, Normalize);
    the model's img_size and ImageNet statistics where the config lists none."""
    from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    img = cfg["model"].get("img_size", 224)
    rows, cols = (img, img) if isinstance(img, int) else tuple(img)
    if rows != cols:
        raise ConfigError(f"model.img_size {img}: the eval preprocessing (centre crop) is square only")
    out = {"resize_shorter": int(rows / 0.9), "crop_pct": 0.9, "crop_size": rows, "interpolation": "bicubic",
           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for t in (cfg["data"]["val"].get("transforms") or []):
        if t.get("enable", True) is False:
            continue
        if t["name"] == "ResizeShorter":
            size, pct = t.get("size", 224), t.get("crop_pct", 0.9)
            out.update(resize_shorter=int(size / pct), crop_pct=pct, interpolation=t.get("interpolation", "bicubic"))
        elif t["name"] == "CenterCrop":
            out["crop_size"] = t.get("size", 224)
        elif t["name"] == "Normalize":
            out.update(mean=list(t.get("mean", IMAGENET_MEAN)), std=list(t.get("std", IMAGENET_STD)))
    if out["crop_size"] != rows:
        raise ConfigError(f"data.val CenterCrop size {out['crop_size']} differs from model.img_size {rows}")
    return out


def _class_names(cfg, num_classes, class_names=None):
    if class_names is not None:
        from passl.data.datasets import read_class_names
        names = read_class_names(class_names)[1]
    else:
        names = None
        dataset = cfg["data"]["val"].get("dataset") or cfg["data"]["train"].get("dataset")
        if dataset:
            try:
                from passl.registry import DATASETS
                names = list(DATASETS.build(dataset).class_names)
            except DataError:
                names = None   # the dataset is not on this machine: numbered names
    if names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for a model of {num_classes} classes; pass --class-names FILE")
    return names


def _load_weights(model, weights):
    from passl.models import load_pretrained
    load_pretrained(model, weights, log=lambda *a: None)


def export_model(cfg, weights, out_dir, class_names=None):
    """Export the eval model of ``cfg`` with ``weights`` to ``out_dir`` (see the module docstring).

    Returns (eager model in eval mode, path prefix of the saved model, preprocessing dict)."""
    import paddle

    import passl
    preprocessing = eval_preprocessing(cfg)
    with paddle.utils.unique_name.guard():
        model = passl.build_model(cfg["model"])
    _load_weights(model, weights)
    model.eval()
    size = preprocessing["crop_size"]
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="images")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, MODEL_PREFIX)
    paddle.jit.save(static, prefix)
    info = {**preprocessing, "model": cfg["model"], "weights": os.path.abspath(weights),
            "class_names": _class_names(cfg, model.num_classes, class_names)}
    write_text(os.path.join(out_dir, PREPROCESS_FILE), json.dumps(info, indent=1))
    return model, prefix, info


def model_files(prefix):
    """(graph file, parameter file) of a ``paddle.jit.save`` prefix: ``.json`` (PIR) or ``.pdmodel``."""
    for ext in (".json", ".pdmodel"):
        if os.path.isfile(prefix + ext):
            return prefix + ext, prefix + ".pdiparams"
    raise DataError(f"{prefix}.json / .pdmodel not found; write the model with tools/export_model.py")


class InferenceModel:
    """A ``paddle.jit.save`` model run by a Paddle Inference predictor: float32 images [B, 3, H, W]
    (numpy or paddle) -> numpy logits [B, num_classes], any B.

    ``device`` 'auto' takes the first GPU when Paddle has CUDA and one is visible, else the CPU, where
    the predictor uses oneDNN kernels (Paddle's CPU builds for x86 have them) on ``threads`` cores."""

    def __init__(self, prefix, device="auto", threads=None):
        import paddle
        from paddle import inference

        from passl.utils.cpu_threads import available_cores
        from passl.utils.distributed import cuda_available
        kind, _, index = device.partition(":")
        if kind not in ("auto", "cpu", "gpu") or (index and not (kind == "gpu" and index.isdigit())):
            raise ConfigError(f"device {device!r}: use auto, cpu, gpu or gpu:N")
        if kind == "auto":
            device = kind = "gpu" if cuda_available() else "cpu"
        elif kind == "gpu" and not cuda_available():
            raise ConfigError(f"device {device!r}: this Paddle build has no CUDA or no GPU is visible; use cpu")
        graph, params = model_files(prefix)
        config = inference.Config(graph, params)
        if kind == "gpu":
            config.enable_use_gpu(256, int(index or 0))
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or available_cores())
            if getattr(paddle.base.core, "is_compiled_with_mkldnn", lambda: False)():
                config.enable_mkldnn()
                config.set_mkldnn_cache_capacity(8)   # one set of kernels per batch shape, at most 8 kept
        config.disable_glog_info()                    # no per-pass log lines on the terminal
        self.device = device
        self.predictor = inference.create_predictor(config)
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, images):
        images = np.ascontiguousarray(images.numpy() if hasattr(images, "numpy") else images, dtype=np.float32)
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(images)
        self.predictor.run()
        return self._output.copy_to_cpu()


def load_exported(model_dir, device="auto"):
    """(InferenceModel, preprocess dict) of an ``export_model`` folder."""
    info_path = os.path.join(model_dir, PREPROCESS_FILE)
    if not os.path.isfile(info_path):
        raise DataError(f"{model_dir} is not an exported model (no {PREPROCESS_FILE}); "
                        "write one with tools/export_model.py")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    return InferenceModel(os.path.join(model_dir, MODEL_PREFIX), device), info


def preprocess_image(path, info):
    """Decode ``path`` (any size) and apply the recorded eval preprocessing -> float32 [3, S, S].
    DataError naming the file if it cannot be decoded."""
    from passl.data.datasets import read_rgb
    from passl.data.transforms import CenterCrop, Normalize, ResizeShorter, Sample
    image = read_rgb(path)
    size = info["crop_size"]
    steps = [ResizeShorter(size, info["crop_pct"], info["interpolation"]), CenterCrop(size),
             Normalize(info["mean"], info["std"])]
    sample = Sample(image=image)
    rng = np.random.default_rng(0)   # eval transforms draw nothing; the argument is required
    for step in steps:
        sample = step(sample, rng)
    return sample.image


def predict(model_dir, paths, topk=5, batch_size=16, device="auto"):
    """Top-``topk`` predictions of each image. Returns (results, errors): results a list of
    (path, [(class index, class name, probability)]) for the decodable images, errors a list of
    DataError messages naming the files that could not be decoded."""
    model, info = load_exported(model_dir, device)
    names = info["class_names"]
    results, errors, ready = [], [], []

    def flush():
        if not ready:
            return
        logits = model(np.stack([r[1] for r in ready])).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        for (path, _), row in zip(ready, probs):
            order = np.argsort(-row, kind="stable")[:min(topk, len(row))]
            results.append((path, [(int(c), names[c], float(row[c])) for c in order]))
        ready.clear()

    for path in paths:
        try:
            ready.append((path, preprocess_image(path, info)))
        except DataError as e:
            errors.append(str(e))
        if len(ready) >= batch_size:
            flush()
    flush()
    return results, errors
