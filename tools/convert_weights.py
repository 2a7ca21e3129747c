"""Convert LV-ViT weights (PyTorch .pth/.pth.tar, PASSL .pd, .pdparams, .pdckpt, .safetensors) to .pdparams or .safetensors.

    python tools/convert_weights.py --src lvvit_s-26M-224-83.3.pth.tar --dst lvvit_s_224.pdparams
    python tools/convert_weights.py --src lvvit_m-56M-224-84.0.pth.tar --dst m384.pdparams --ema --img-size 384
    python tools/convert_weights.py --src output/lvvit_tiny/epoch_300.pd --dst lvvit_t.safetensors   # PASSL v1.1

PyTorch is not needed, and no file is ever run as code: every input is read by a restricted reader.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="weights or checkpoint (.pth / .pth.tar, PASSL .pd, .pdparams, "
                                                ".pdckpt, .safetensors): a state dict, or a dict holding "
                                                "state_dict / state_dict_ema / model / ema")
    p.add_argument("--dst", required=True, help="output .pdparams or .safetensors file (the latter records "
                                                "variant and img_size in its metadata)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema: the published ones)")
    p.add_argument("--img-size", type=cli.number(1), default=None,
                   help="resize pos_embed for this input size (default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --dst")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.errors import CheckpointError
    from passl.models.convert import convert_checkpoint
    from passl.utils.fileio import ensure_writable_dir
    if not args.dst.endswith((".pdparams", ".safetensors")):
        raise CheckpointError(f"--dst {args.dst}: the output must end in .pdparams or .safetensors")
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.dst)), "--dst")
    report = convert_checkpoint(args.src, args.dst, ema=args.ema, img_size=args.img_size, force=args.force)
    variant = report["variant"] or "no published variant (custom width/depth/stem)"
    print(f"detected variant: {variant} at {report['img_size']} px, {report['num_classes']} classes")
    print(f"converted {report['keys']} tensors{' (EMA weights)' if args.ema else ''} -> {report['dst']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
