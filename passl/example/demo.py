"""The end-to-end example: Token Labeling on the digit scenes, on a laptop CPU, in minutes.

Steps, each through the toolkit's own entry points (what a user runs by hand):

1. build the example dataset (``passl.example.scenes``, as tools/make_example.py) unless present;
2. train the annotator, a small CNN, on image-level labels (passl.engine.train, configs/example/annotator_digits.yaml);
3. label every training image densely with it (``generate_label_maps``, as tools/generate_labels.py);
4. train the same small LV-ViT twice on the same budget: with token labeling
   (configs/example/lvvit_digits_tl.yaml) and with the class token only (lvvit_digits_cls.yaml);
5. evaluate both final models on the validation set and print a two-row table.

Everything goes under ``out_dir`` (default output/demo); ``results.json`` keeps the numbers. Each run of
the demo starts anew: an earlier demo's ``out_dir`` is moved to ``out_dir.old-<time>``, nothing is deleted.
"""
import contextlib
import json
import os
import time

__all__ = ["run_demo", "DEMO_CONFIGS"]

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "example")
DEMO_CONFIGS = {
    "annotator": os.path.join(_CONFIG_DIR, "annotator_digits.yaml"),
    "token_labeling": os.path.join(_CONFIG_DIR, "lvvit_digits_tl.yaml"),
    "class_token_only": os.path.join(_CONFIG_DIR, "lvvit_digits_cls.yaml"),
}
METHODS = (("token_labeling", "LV-ViT + token labeling"), ("class_token_only", "LV-ViT, class token only"))


def _banner(log, text):
    log(f"\n=== {text} ===")


def _train(config, overrides):
    """Train with passl.engine.train from ``config`` + ``overrides``; then evaluate the final weights.
    Returns {top1, top5, seconds (training + evaluation), output_dir, weights}."""
    from passl.config import load_config
    from passl.engine import evaluate_only, train
    from passl.errors import PasslError
    cfg = load_config(config, overrides)
    start = time.time()
    status = train(cfg)
    if status != 0:
        raise PasslError(f"training {config} stopped with status {status}; see {cfg['output_dir']}/train.log")
    final = os.path.join(cfg["output_dir"], "latest.pdckpt")   # the last epoch, not the best: no selection on val
    result = evaluate_only(cfg, final)
    return {"top1": result["top1"], "top5": result["top5"], "seconds": time.time() - start,
            "output_dir": cfg["output_dir"], "weights": final}


def run_demo(data_dir="data/digit_scenes", out_dir="output/demo", train_per_class=None, val_per_class=None,
             annotator_epochs=None, lvvit_epochs=None, force_data=False, build_data=True, progress=True, log=print):
    """Run the whole example (see the module docstring). None keeps the builder's image counts and the
    configs' epochs. ``build_data`` False uses ``data_dir`` as it is (any folder with train/ and val/ in
    ImageNet layout; the image size comes from its meta.json, else 80x64).
    Returns {"rows": [{method, top1, top5, seconds, output_dir, weights}], "annotator": {...}, "labels": {...},
    "dataset": {...}, "seconds"}; results.json holds the same."""
    start = time.time()
    data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)
    if os.path.commonpath([data_dir, out_dir]) in (data_dir, out_dir):
        from passl.errors import ConfigError
        raise ConfigError(f"--data {data_dir} and --out {out_dir} must not contain one another: each demo run "
                          "starts in an empty --out; choose folders side by side")
    with _fresh_dir(out_dir, log):
        return _run_demo(start, data_dir, out_dir, train_per_class, val_per_class, annotator_epochs, lvvit_epochs,
                         force_data, build_data, progress, log)


@contextlib.contextmanager
def _fresh_dir(out_dir, log):
    """Hold ``out_dir`` (one demo at a time) after moving an earlier demo's files to ``out_dir.old-<time>``."""
    from passl.utils.fileio import DirectoryLock, move_aside
    lock = DirectoryLock(out_dir, "demo", "--out").acquire()
    try:
        if any(name != DirectoryLock.NAME for name in os.listdir(out_dir)):
            moved = move_aside(out_dir)
            lock.release(moved_to=moved)
            log(f"moved the earlier demo in {out_dir} to {moved} (delete it when you no longer need it)")
            lock = DirectoryLock(out_dir, "demo", "--out").acquire()
        lock.describe()
        yield
    finally:
        lock.release()


def _run_demo(start, data_dir, out_dir, train_per_class, val_per_class, annotator_epochs, lvvit_epochs, force_data,
              build_data, progress, log):
    from passl.annotate import build_cnn_annotator, generate_label_maps, list_images
    from passl.config import load_config
    from passl.example.scenes import build_digit_scenes, read_meta
    from passl.utils.distributed import select_device
    from passl.utils.fileio import write_text

    _banner(log, "1/4 example dataset")
    if build_data:
        counts = {k: v for k, v in (("train_per_class", train_per_class), ("val_per_class", val_per_class)) if v}
        data = build_digit_scenes(data_dir, force=force_data, log=log, progress=progress, **counts)
        width, height = data["image_size"]
    else:
        meta = read_meta(data_dir) or {}
        width, height = (meta.get("image_size") or {}).get("width", 80), (meta.get("image_size") or {}).get("height", 64)
        data = {"train": len(list_images(os.path.join(data_dir, "train"))),
                "val": len(list_images(os.path.join(data_dir, "val")))}
        log(f"using {data_dir} as it is: {data['train']} train + {data['val']} val images, labelled at {width}x{height}")
    roots = [f"data.train.dataset.root={data_dir}/train", f"data.val.dataset.root={data_dir}/val"]

    _banner(log, "2/4 annotator: a small CNN trained on image labels")
    ann_dir = os.path.join(out_dir, "annotator")
    ann_over = roots + [f"output_dir={ann_dir}"] + ([f"epochs={annotator_epochs}"] if annotator_epochs else [])
    annotator_result = _train(DEMO_CONFIGS["annotator"], ann_over)

    _banner(log, "3/4 dense label maps from the annotator")
    select_device("auto", log=None)
    model_cfg = load_config(DEMO_CONFIGS["annotator"], ann_over)["model"]
    annotator = build_cnn_annotator(model_cfg["arch"], model_cfg["num_classes"], annotator_result["weights"],
                                    model_cfg["width"])
    labels_dir = os.path.join(out_dir, "labels")
    labels = generate_label_maps(annotator, os.path.join(data_dir, "train"), labels_dir, (width, height),
                                 topk=5, batch_size=100, progress=progress, log=log)

    rows = []
    for step, (key, method) in enumerate(METHODS):
        _banner(log, f"4/4 ({step + 1}/2) {method}")
        over = roots + [f"output_dir={os.path.join(out_dir, key)}"] + (
            [f"epochs={lvvit_epochs}"] if lvvit_epochs else [])
        if key == "token_labeling":
            over.append(f"data.train.label_store.root={labels_dir}")
        result = _train(DEMO_CONFIGS[key], over)
        rows.append({"method": method, **result})

    summary = {"rows": rows, "annotator": annotator_result, "labels": {k: labels[k] for k in ("written", "existing",
                                                                                             "map_shape")},
               "dataset": {"dir": data_dir, "train": data["train"], "val": data["val"]},
               "seconds": time.time() - start}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=1))
    log("\n" + format_table(summary))
    tl, cls = rows
    log(f"demo done in {summary['seconds'] / 60:.1f} min: token labeling top-1 {tl['top1']:.1f}% vs class token only "
        f"{cls['top1']:.1f}% (annotator {annotator_result['top1']:.1f}%); results in {out_dir}/results.json")
    return summary


def format_table(summary):
    """The two-row result table as text."""
    lines = [f"{'method':<28s} {'val top-1':>9s} {'top-5':>7s} {'time':>8s}"]
    for row in summary["rows"]:
        lines.append(f"{row['method']:<28s} {row['top1']:8.1f}% {row['top5']:6.1f}% {row['seconds']:7.0f}s")
    return "\n".join(lines)
