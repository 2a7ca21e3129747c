"""Shared plumbing for the command-line tools in tools/: clean errors, config arguments, ranged numbers."""
import argparse
import sys

from passl.errors import PasslError
from passl.ranges import Range


def add_config_args(parser, required=True):
    parser.add_argument("-c", "--config", required=required, help="YAML config file")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. -o epochs=100 -o data.train.batch_size=64 "
                             "(values are YAML; repeatable)")
    return parser


def run(main, argv=None):
    """Call ``main(argv)``; a PasslError is printed as one line (no traceback) with exit status 2, and
    Ctrl-C outside the training loop (which saves and stops by itself) as one line with status 130."""
    try:
        code = main(argv)
    except PasslError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def number(low=None, high=None, kind=int, **options):
    """An argparse ``type`` for a number in a range (passl.ranges.Range), e.g. ``type=cli.number(1)``:
    anything else stops with 'argument --x: expected an integer >= 1, got 0'."""
    valid = Range(low, high, kind=kind, **options)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {valid.describe()}, got {text!r}") from None
        if not valid.contains(value):
            raise argparse.ArgumentTypeError(f"expected {valid.describe()}, got {text}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line like every other error (no usage block)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser(description):
    return _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
