"""`lln-serve` command line. Subcommands land with their issues."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lln-serve", description="Long-context inference on LLN attention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the OpenAI-compatible server (not available yet)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        print(
            "lln-serve serve: the HTTP server is not built yet (it lands with the server issue). "
            "What exists today: the attention core in lln_core/ (see README).",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
