"""Show what the model is trained on for one sample: the augmented image and every token's target.

    python tools/inspect_labels.py -c configs/lvvit/lvvit_small.yaml --index 123 [--seed 0] \
        --out sample.npz [--png sample.png]

sample.npz holds image [3, H, W] float32 (exactly what the model sees), token_targets [N, C] float32
(rows sum to 1), cls_target [C], grid (rows, cols), label. The PNG shows the image (un-normalised)
with each token's top class written on it, so the alignment of labels and pixels can be checked by eye.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.cpu_threads import configure_cpu_threads  # noqa: E402

configure_cpu_threads()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]))
    p.add_argument("--index", type=int, required=True, help="training sample index")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--png", help="also draw the image with each token's top class")
    p.add_argument("--scale", type=int, default=3, help="PNG magnification")
    return p


def render(result, path, scale):
    """Write the un-normalised image, the token grid and each token's top class to a PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    from passl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    image = result["image"].transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    image = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    rows, cols = (int(v) for v in result["grid"])
    cell_w, cell_h = image.width / cols, image.height / rows
    top = result["token_targets"].argmax(-1).reshape(rows, cols)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * cell_w, r * cell_h
            draw.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], outline=(255, 255, 0))
            text = str(int(top[r, c]))
            draw.text((x0 + 2, y0 + 1), text, fill=(0, 0, 0))
            draw.text((x0 + 1, y0), text, fill=(255, 255, 255))
    image.save(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import numpy as np

    from passl.config import load_config
    from passl.data.inspect import inspect_sample

    cfg = load_config(args.config, args.override)
    result = inspect_sample(cfg, args.index, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, image=result["image"], token_targets=result["token_targets"],
             cls_target=result["cls_target"], grid=result["grid"], label=result["label"])
    if args.png:
        render(result, args.png, args.scale)
    top = int(result["cls_target"].argmax())
    names = result["classes"]
    name = names[top] if top < len(names) else str(top)
    print(f"sample {args.index} ({result['path']}, label {int(result['label'])}): cls target top class "
          f"{top} ({name}, p={result['cls_target'][top]:.3f}); wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
