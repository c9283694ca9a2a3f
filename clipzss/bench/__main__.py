"""``python -m clipzss.bench [--device cuda] [--no-mlflow]``: the benchmark without the clipzss console command."""

import argparse
import sys

from clipzss.bench import add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipzss.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
