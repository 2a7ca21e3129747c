"""Generate dense label maps ([2, K, h, w] float16, full coverage) for every image of a folder.

    # a CNN annotator (small_cnn or any paddle.vision.models classifier) with your own weights
    python tools/generate_labels.py --images data/my_dataset/train --out data/my_labels \
        --arch resnet18 --num-classes 37 --weights resnet18_mine.pdparams --image-size 224 224
    # an LV-ViT annotator (its aux head), model from a config
    python tools/generate_labels.py --images data/imagenet/train --out data/labels_lvvit \
        -c configs/lvvit/lvvit_small.yaml --weights lvvit_s.pdparams
    # several processes (GPUs or CPU), each takes its share of the images
    python -m paddle.distributed.launch --gpus 0,1,2,3 tools/generate_labels.py ...

Rerunning skips maps that exist (an interrupted run resumes). Train with
label_store: {name: npy, root: <out>, coverage: full} (or {name: packed, root: <out>} for --store packed).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]), required=False)
    p.add_argument("--images", required=True, help="image folder (e.g. dataset/train with <class_dir>/<image>)")
    p.add_argument("--out", required=True, help="label-map folder to write (or complete)")
    p.add_argument("--weights", required=True, help="annotator weights (.pdparams, a .pdckpt checkpoint, .safetensors, .pth)")
    p.add_argument("--arch", help="CNN annotator: small_cnn or a paddle.vision.models name (resnet18, ...); "
                                  "without it, -c gives an LV-ViT model")
    p.add_argument("--num-classes", type=cli.number(1), help="classes of the CNN annotator")
    p.add_argument("--width", type=cli.number(1), default=16, help="width of small_cnn")
    p.add_argument("--image-size", type=cli.number(1), nargs=2, metavar=("W", "H"),
                   help="every image is resized to W x H (default: the LV-ViT's img_size; 224 224 for a CNN)")
    p.add_argument("--mean", type=cli.number(kind=float), nargs=3, default=list(IMAGENET_MEAN))
    p.add_argument("--std", type=cli.number(0, kind=float, low_open=True), nargs=3, default=list(IMAGENET_STD))
    p.add_argument("--interpolation", default="bilinear", choices=sorted(INTERPOLATIONS))
    p.add_argument("--topk", type=cli.number(1), default=5, help="classes kept per location (K)")
    p.add_argument("--store", default="npy", choices=["npy", "pth", "packed"], help="label store to write")
    p.add_argument("--batch-size", type=cli.number(1), default=32)
    p.add_argument("--num-workers", type=cli.number(1), default=2, help="image-decoding threads")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip undecodable images (counted and listed at the end) instead of stopping")
    p.add_argument("--max-images", type=cli.number(0),
                   help="write at most this many maps, then stop (rerun to continue)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.annotate import build_cnn_annotator, build_lvvit_annotator, generate_label_maps
    from passl.errors import ConfigError
    from passl.utils import distributed as du
    from passl.utils.fileio import ensure_writable_dir

    ensure_writable_dir(args.out, "--out")

    du.select_device(args.device, log=None)
    if args.arch:
        if not args.num_classes:
            raise ConfigError("--arch needs --num-classes (the classes the annotator was trained for)")
        annotator = build_cnn_annotator(args.arch, args.num_classes, args.weights, args.width)
        image_size = args.image_size or [224, 224]
    elif args.config:
        from passl.config import load_config
        cfg = load_config(args.config, args.override)
        annotator = build_lvvit_annotator(cfg["model"], args.weights)
        rows, cols = annotator.model.img_size
        image_size = args.image_size or [cols, rows]
        if list(image_size) != [cols, rows]:
            raise ConfigError(f"--image-size {image_size} differs from the LV-ViT's img_size (W x H {cols} x {rows}); "
                              "set model.img_size with -o instead")
    else:
        raise ConfigError("choose the annotator: --arch NAME --num-classes C (a CNN), or -c CONFIG (an LV-ViT)")
    summary = generate_label_maps(
        annotator, args.images, args.out, image_size, args.mean, args.std, topk=args.topk, store=args.store,
        batch_size=args.batch_size, num_workers=args.num_workers, skip_bad_images=args.skip_bad_images,
        max_images=args.max_images, rank=du.rank(), world_size=du.world_size(), interpolation=args.interpolation,
        progress=not args.no_progress)
    return 0 if summary["complete"] or args.max_images is not None else 1


if __name__ == "__main__":
    cli.run(main)
