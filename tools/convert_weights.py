"""Convert a published PyTorch LV-ViT checkpoint to a Paddle .pdparams file (PyTorch not needed).

    python tools/convert_weights.py --src lvvit_s-26M-224-83.3.pth.tar --dst lvvit_s_224.pdparams
    python tools/convert_weights.py --src lvvit_m-56M-224-84.0.pth.tar --dst m384.pdparams --ema --img-size 384
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="PyTorch checkpoint (.pth / .pth.tar): a state dict, or a dict "
                                                "holding state_dict / state_dict_ema / model")
    p.add_argument("--dst", required=True, help="output .pdparams file")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema (the published EMA weights)")
    p.add_argument("--img-size", type=int, default=None,
                   help="resize pos_embed for this input size (default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --dst")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.errors import CheckpointError
    from passl.models.convert import convert_checkpoint
    if not args.dst.endswith(".pdparams"):
        raise CheckpointError(f"--dst {args.dst}: the output must end in .pdparams")
    report = convert_checkpoint(args.src, args.dst, ema=args.ema, img_size=args.img_size, force=args.force)
    variant = report["variant"] or "no published variant (custom width/depth/stem)"
    print(f"detected variant: {variant} at {report['img_size']} px, {report['num_classes']} classes")
    print(f"converted {report['keys']} tensors{' (EMA weights)' if args.ema else ''} -> {report['dst']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
