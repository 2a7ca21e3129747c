"""Show what the model is trained on for one sample: the augmented image and every token's target.

    python tools/inspect_labels.py -c configs/lvvit/lvvit_small.yaml --index 123 [--seed 0] \
        --out sample.npz [--png sample.png]

sample.npz holds image [3, H, W] float32 (exactly what the model sees), token_targets [N, C] float32
(rows sum to 1), token_weight [N] (0: outside the label map's coverage, no dense target), cls_target [C],
grid (rows, cols), label. The PNG shows the image (un-normalised) with each token's top class written on
it ('-' without a target), so the alignment of labels and pixels can be checked by eye.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]))
    p.add_argument("--index", type=int, required=True, help="training sample index")
    p.add_argument("--seed", type=cli.number(0), default=0, help="seed of the augmentation")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--png", help="also draw the image with each token's top class")
    p.add_argument("--scale", type=cli.number(1), default=3, help="PNG magnification")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.config import load_config
    from passl.data.inspect import inspect_sample, render_tokens, save_sample
    from passl.utils.fileio import ensure_writable_dir

    cfg = load_config(args.config, args.override)
    for flag, path in (("--out", args.out), ("--png", args.png)):
        if path:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    result = inspect_sample(cfg, args.index, args.seed)
    save_sample(result, args.out)
    if args.png:
        render_tokens(result, args.png, args.scale)
    top = int(result["cls_target"].argmax())
    names = result["classes"]
    name = names[top] if top < len(names) else str(top)
    print(f"sample {args.index} ({result['path']}, label {int(result['label'])}): cls target top class "
          f"{top} ({name}, p={result['cls_target'][top]:.3f}); wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
