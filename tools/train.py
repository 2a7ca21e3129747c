"""Train or evaluate an LV-ViT model from a YAML config.

    python tools/train.py -c configs/lvvit/lvvit_tiny.yaml [-o key=value]...
    python tools/train.py -c configs/lvvit/lvvit_tiny.yaml --load W.pdparams --evaluate-only
    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 tools/train.py -c ...
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]))
    p.add_argument("--load", metavar="WEIGHTS", help="start from these model weights (.pdparams, .pdckpt, "
                                                     ".safetensors, .pth / .pth.tar, PASSL .pd)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run exactly; without a path, the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew although output_dir holds a run: that run is moved to output_dir.old-<time> "
                        "(nothing is deleted)")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate --load on the validation set and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.config import load_config, to_yaml
    from passl.errors import ConfigError

    cfg = load_config(args.config, args.override)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.evaluate_only and not args.load:
        raise ConfigError("--evaluate-only needs --load WEIGHTS (a .pdparams file or a checkpoint)")
    if args.evaluate_only and args.resume:
        raise ConfigError("--evaluate-only and --resume do not go together; use --load WEIGHTS")
    if args.overwrite and (args.resume or args.evaluate_only):
        raise ConfigError("--overwrite starts a new training run; it does not go with --resume or --evaluate-only")
    from passl.engine import evaluate_only, train
    if args.evaluate_only:
        evaluate_only(cfg, args.load)
        return 0
    return train(cfg, load=args.load, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    cli.run(main)
