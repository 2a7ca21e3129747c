"""Shared plumbing for the command-line tools in tools/: clean errors, config arguments."""
import argparse
import sys

from passl.errors import PasslError


def add_config_args(parser, required=True):
    parser.add_argument("-c", "--config", required=required, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. -o epochs=100 -o data.train.batch_size=64 "
                             "(values are YAML; repeatable)")
    return parser


def run(main, argv=None):
    """Call ``main(argv)``; a PasslError is printed as one line (no traceback) with exit status 2."""
    try:
        code = main(argv)
    except PasslError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def parser(description):
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
