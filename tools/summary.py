"""Print an LV-ViT's parameter count, multiply-adds per image and token grid from a config.

    python tools/summary.py -c configs/lvvit/lvvit_small.yaml [-o model.img_size=384]
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    return cli.add_config_args(cli.parser(__doc__.splitlines()[0]))


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.config import load_config
    from passl.models.complexity import format_summary, summarize

    cfg = load_config(args.config, args.override)
    model_cfg = cfg["model"]
    print(format_summary(summarize(model_cfg), title=f"{model_cfg['name']} ({args.config})"))
    return 0


if __name__ == "__main__":
    cli.run(main)
