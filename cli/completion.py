"""``sealstore completion bash|zsh|fish``: the shell completion script, made by shtab.

shtab reads the argparse parser itself, so the script always knows every
command, action and option of this release; nothing is kept by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sealstore.cli.commands import command

__all__ = ["SHELLS", "register"]

SHELLS = ("bash", "zsh", "fish")


def register(sub: Any) -> None:
    p = command(
        sub,
        "completion",
        _completion,
        reports=False,
        help="print the shell completion script (bash, zsh, fish)",
        description="Print a completion script for SHELL. Load it in the current shell with "
        'eval "$(sealstore completion bash)" (zsh likewise; fish: sealstore completion fish '
        "| source), or install it where the shell looks (docs/CLI.md).",
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")


def _completion(args: argparse.Namespace) -> int:
    try:
        import shtab
    except ImportError:
        raise ImportError(
            "shell completion needs shtab: pip install 'sealstore[completion]'"
        ) from None
    from sealstore.cli.main import build_parser

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0
