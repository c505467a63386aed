"""``python -m fastconv``: the command line; ``bench`` runs :mod:`fastconv._bench`."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastconv",
                                     description="fastconv command-line tools")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # add_help=False: `bench -h` and every bench option pass through untouched
    # to _bench.main, which owns them.
    commands.add_parser("bench", add_help=False,
                        help="time the standard convolution suite (bench -h for options)")
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from fastconv import _bench

    return _bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
