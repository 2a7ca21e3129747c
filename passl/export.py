"""Static inference models: export a model with its eval preprocessing, and predict with it.

``export_model`` writes, into ``out_dir``:

- ``inference.json`` / ``.pdmodel`` + ``inference.pdiparams``: ``paddle.jit.save`` of the eval model,
  input ``[None, 3, H, W]`` float32 (any batch size), output ``[B, num_classes]`` logits;
- ``preprocess.json``: ``transforms``, the config's ``data.val.transforms`` with their sizes resolved
  for the model, which ``predict`` runs through the same dataset code as evaluation (per-sample steps,
  then ``finish_batch``), so exported predictions and evaluation cannot disagree; for readers and other
  runtimes, the same steps flattened (SPEC 5 evaluation: ``resize_shorter`` = int(crop_size / crop_pct)
  with ``interpolation``, centre crop ``crop_size``, ``mean`` / ``std``); and the class names.

The graph is traced on the device it is meant for (``device``, recorded in preprocess.json as
``traced_on``): Paddle chooses the attention kernel while tracing (paddle/nn/functional/sdpa.py reads
the expected place in static mode), so a GPU trace holds the GPU's fused attention kernels, which the
CPU has no kernel for, and a CPU trace the plain matmul-softmax-matmul.

``predict`` runs that folder with Paddle Inference (``InferenceModel``: oneDNN kernels and fused
passes on the CPU, the GPU where Paddle has CUDA and one is visible, there with memory optimisation on,
so activations share buffers; ``precision`` fp32, or fp16 on a GPU: Paddle's mixed-precision pass runs
the graph in float16 with float32 inputs and outputs) and returns the top-5 classes of images of any
size (JPEG, PNG, ... anything PIL decodes). On a 2-core CPU the predictor ran lvvit_t at 63-65
images/s where the eager model ran 26-36 and ``paddle.jit.load`` 26-29 (benchmarks/bench_eval.py).
"""
import json
import os

import numpy as np

from passl.errors import ConfigError, DataError
from passl.utils.fileio import write_text, writing

__all__ = ["export_model", "eval_preprocessing", "load_exported", "InferenceModel", "preprocess_image", "predict",
           "PREPROCESS_FILE", "MODEL_PREFIX", "PRECISIONS", "predictor_config"]

PREPROCESS_FILE = "preprocess.json"
MODEL_PREFIX = "inference"
PRECISIONS = ("fp32", "fp16")


def eval_preprocessing(cfg, img_size):
    """The eval preprocessing of a resolved config for a model of ``img_size`` (rows, cols), as
    preprocess.json records it: {transforms, input_size, and the flat description of the module docstring}.
    ConfigError if data.val.transforms do not turn every image into the model's input size."""
    from passl.data.pipeline import build_transforms, resolve_transforms, split_device_stage
    from passl.data.transforms import CenterCrop, ResizeShorter
    if img_size is None:
        raise ConfigError(f"model {cfg['model'].get('name')} takes any input size; export needs a model with a "
                          "fixed img_size")
    rows, cols = (img_size, img_size) if isinstance(img_size, int) else (int(v) for v in img_size)
    key = "data.val.transforms"
    specs = [t for t in resolve_transforms(cfg["data"]["val"].get("transforms"), img_size, key)
             if t.get("enable", True) is not False]
    per_sample, normalize, _ = split_device_stage(build_transforms(specs, img_size, key), key)
    for probe in ((cols * 3 // 2, rows), (cols, rows * 3 // 2)):
        out = _probe(per_sample, probe)
        if out != (cols, rows):
            raise ConfigError(f"{key} turn a {probe[0]}x{probe[1]} image into {out[0]}x{out[1]}, but the model "
                              f"takes {cols}x{rows} (model.img_size); end them with a CenterCrop of that size")
    info = {"transforms": specs, "input_size": [rows, cols], "crop_size": rows,
            "mean": list(normalize.mean) if normalize else [0.0, 0.0, 0.0],
            "std": list(normalize.std) if normalize else [1.0, 1.0, 1.0]}
    for t in per_sample:
        if isinstance(t, ResizeShorter):
            info.update(resize_shorter=t.target_short_side(), crop_pct=t.crop_pct, interpolation=t.interpolation)
        elif isinstance(t, CenterCrop):
            info["crop_size"] = t.size
    return info


def _probe(transforms, size):
    """(width, height) of a blank ``size`` image after ``transforms``."""
    from PIL import Image

    from passl.data.transforms import Sample
    sample, rng = Sample(image=Image.new("RGB", size)), np.random.default_rng(0)
    for t in transforms:
        sample = t(sample, rng)
    return sample.image_size()


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


def export_model(cfg, weights, out_dir, class_names=None, device="cpu"):
    """Export the eval model of ``cfg`` with ``weights`` to ``out_dir`` (see the module docstring), traced
    on ``device`` ('cpu' or 'gpu', Paddle's current device is set to it).

    Returns (eager model in eval mode, path prefix of the saved model, preprocessing dict)."""
    import paddle

    import passl
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"export device {device!r}: use cpu or gpu")
    paddle.set_device(device)
    with paddle.utils.unique_name.guard():
        model = passl.build_model(cfg["model"])
    preprocessing = eval_preprocessing(cfg, model.img_size)
    _load_weights(model, weights)
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, *preprocessing["input_size"]], "float32", name="images")]
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, MODEL_PREFIX)
    with writing(prefix):   # disk full: one line naming the file
        paddle.jit.save(static, prefix)
    info = {**preprocessing, "model": cfg["model"], "weights": os.path.abspath(weights), "traced_on": device,
            "class_names": _class_names(cfg, model.num_classes, class_names)}
    write_text(os.path.join(out_dir, PREPROCESS_FILE), json.dumps(info, indent=1))
    return model, prefix, info


def model_files(prefix):
    """(graph file, parameter file) of a ``paddle.jit.save`` prefix: ``.json`` (PIR) or ``.pdmodel``."""
    for ext in (".json", ".pdmodel"):
        if os.path.isfile(prefix + ext):
            return prefix + ext, prefix + ".pdiparams"
    raise DataError(f"{prefix}.json / .pdmodel not found; write the model with tools/export_model.py")


def resolve_device(device):
    """'auto' | 'cpu' | 'gpu' | 'gpu:N' -> (kind 'cpu' or 'gpu', device string); ConfigError otherwise, or for
    a GPU this Paddle cannot use. 'auto' is the first GPU when Paddle has CUDA and one is visible."""
    from passl.utils.distributed import cuda_available
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "gpu") or (index and not (kind == "gpu" and index.isdigit())):
        raise ConfigError(f"device {device!r}: use auto, cpu, gpu or gpu:N")
    if kind == "auto":
        device = kind = "gpu" if cuda_available() else "cpu"
    elif kind == "gpu" and not cuda_available():
        raise ConfigError(f"device {device!r}: this Paddle build has no CUDA or no GPU is visible; use cpu")
    return kind, device


class InferenceModel:
    """A ``paddle.jit.save`` model run by a Paddle Inference predictor: float32 images [B, 3, H, W]
    (numpy or paddle) -> numpy logits [B, num_classes] (float32), any B.

    ``device`` 'auto' takes the first GPU when Paddle has CUDA and one is visible, else the CPU, where
    the predictor uses oneDNN kernels (Paddle's CPU builds for x86 have them) on ``threads`` cores.
    ``precision`` 'fp16' runs the graph in float16 on a GPU (``Config.enable_use_gpu`` with
    ``PrecisionType.Half``: Paddle's mixed-precision pass keeps the float32 inputs and outputs and the
    ops it lists as unsafe in float32); on the CPU it is a ConfigError rather than a quiet float32 run,
    since Paddle Inference has no float16 CPU kernels. Memory optimisation is on for the GPU
    (``predictor_config``); where Paddle refuses it for a graph, a warning says so and the model runs
    without it."""

    def __init__(self, prefix, device="auto", threads=None, precision="fp32"):
        import warnings

        from paddle import inference
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        kind, device = resolve_device(device)
        if precision == "fp16" and kind == "cpu":
            raise ConfigError("precision fp16 needs a GPU (Paddle Inference has no float16 CPU kernels); "
                              "use --precision fp32 on the CPU")
        graph, params = model_files(prefix)
        self.device, self.precision, self.memory_optim = device, precision, kind == "gpu"
        try:
            self.predictor = inference.create_predictor(
                predictor_config(graph, params, device, precision, threads, self.memory_optim))
        except Exception as e:   # noqa: BLE001 (Paddle raises ValueError / RuntimeError from C++)
            if not self.memory_optim:
                raise
            warnings.warn(f"Paddle Inference refused memory optimisation for {graph} ({str(e).splitlines()[0]}); "
                          "running without it")
            self.memory_optim = False
            self.predictor = inference.create_predictor(predictor_config(graph, params, device, precision, threads,
                                                                         False))
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, images):
        images = np.ascontiguousarray(images.numpy() if hasattr(images, "numpy") else images, dtype=np.float32)
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(images)
        self.predictor.run()
        return self._output.copy_to_cpu().astype(np.float32, copy=False)


def predictor_config(graph, params, device, precision="fp32", threads=None, memory_optim=True):
    """The ``paddle.inference.Config`` of ``InferenceModel`` for ``device`` ('cpu', 'gpu' or 'gpu:N').

    GPU: ``enable_use_gpu`` with ``PrecisionType.Half`` for fp16 (Paddle's one-step mixed precision),
    and memory optimisation when ``memory_optim`` (activations reuse dead tensors' buffers; a PIR graph,
    ``.json``, needs the new executor for it: without, Paddle 3.3.1's predictor stops with "Not find
    predictor_id 0 and pass_name memory_optimize_pass"). CPU: oneDNN on ``threads`` cores, without
    memory optimisation, which did not lower the peak there (lvvit_t, batch 16 and 64; benchmarks/README.md)."""
    import paddle
    from paddle import inference

    from passl.utils.cpu_threads import available_cores
    config = inference.Config(graph, params)
    kind, _, index = device.partition(":")
    if kind == "gpu":
        mode = inference.PrecisionType.Half if precision == "fp16" else inference.PrecisionType.Float32
        config.enable_use_gpu(256, int(index or 0), mode)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or available_cores())
        if getattr(paddle.base.core, "is_compiled_with_mkldnn", lambda: False)():
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(8)   # one set of kernels per batch shape, at most 8 kept
    if memory_optim:
        if graph.endswith(".json"):
            config.enable_new_executor(True)
        config.enable_memory_optim()
    config.disable_glog_info()                    # no per-pass log lines on the terminal
    return config


def load_exported(model_dir, device="auto", precision="fp32"):
    """(InferenceModel, preprocess dict) of an ``export_model`` folder. ConfigError for a folder traced on
    the GPU run on the CPU (its attention kernels exist on the GPU only)."""
    info_path = os.path.join(model_dir, PREPROCESS_FILE)
    if not os.path.isfile(info_path):
        raise DataError(f"{model_dir} is not an exported model (no {PREPROCESS_FILE}); "
                        "write one with tools/export_model.py")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    kind, device = resolve_device(device)
    traced_on = info.get("traced_on", "cpu")   # folders from before traced_on was recorded were traced on the CPU
    if traced_on == "gpu" and kind == "cpu":
        raise ConfigError(f"{model_dir} was exported for the GPU (its graph holds GPU-only attention kernels); "
                          "predict on a GPU, or export again with tools/export_model.py --device cpu")
    return InferenceModel(os.path.join(model_dir, MODEL_PREFIX), device, precision=precision), info


def _image_dataset(paths, info):
    """The evaluation dataset code over image files: ``info['transforms']`` per sample, then ``finish_batch``.
    A folder exported before ``transforms`` was recorded gets them from its flat description."""
    from passl.data.datasets import ImageFiles, TokenLabelDataset
    from passl.data.pipeline import build_transforms
    specs = info.get("transforms") or [
        {"name": "ResizeShorter", "size": info["crop_size"], "crop_pct": info["crop_pct"],
         "interpolation": info["interpolation"]},
        {"name": "CenterCrop", "size": info["crop_size"]},
        {"name": "Normalize", "mean": info["mean"], "std": info["std"]}]
    return TokenLabelDataset(ImageFiles(paths), build_transforms(specs, key=f"{PREPROCESS_FILE} transforms"),
                             num_classes=1, targets=False)


def _finish(dataset, images):
    """uint8 images [B, 3, H, W] (numpy) -> float32 numpy, as evaluation's ``finish_batch`` makes them."""
    import paddle
    return dataset.finish_batch({"image": paddle.to_tensor(images)})["image"].numpy()


def preprocess_image(path, info):
    """Decode ``path`` (any size) and apply the recorded eval preprocessing -> float32 [3, H, W].
    DataError naming the file if it cannot be decoded."""
    dataset = _image_dataset([path], info)
    return _finish(dataset, dataset.load_item(0, np.random.default_rng(0))["image"][None])[0]


def predict(model_dir, paths, topk=5, batch_size=16, device="auto", precision="fp32"):
    """Top-``topk`` predictions of each image. Returns (results, errors): results a list of
    (path, [(class index, class name, probability)]) for the decodable images, errors a list of
    DataError messages naming the files that could not be decoded."""
    model, info = load_exported(model_dir, device, precision)
    names = info["class_names"]
    dataset = _image_dataset(paths, info)
    rng = np.random.default_rng(0)   # eval transforms draw nothing; the argument is required
    results, errors, ready = [], [], []

    def flush():
        if not ready:
            return
        logits = model(_finish(dataset, np.stack([r[1] for r in ready]))).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        for (path, _), row in zip(ready, probs):
            order = np.argsort(-row, kind="stable")[:min(topk, len(row))]
            results.append((path, [(int(c), names[c], float(row[c])) for c in order]))
        ready.clear()

    for index, path in enumerate(paths):
        try:
            ready.append((path, dataset.load_item(index, rng)["image"]))
        except DataError as e:
            errors.append(str(e))
        if len(ready) >= batch_size:
            flush()
    flush()
    return results, errors
