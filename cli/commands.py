"""What every command shares: how it is registered, its common options, how it reports.

Each command module calls :func:`command` (and :func:`group` for ``keys ...``,
``store ...``): one place gives every command the options that may follow
its name (``-q``, and ``--json`` where it reports), the store options, the
thread count and the progress switch, so they read and behave the same
everywhere. A command then reports through :func:`say` (a human line on
stderr), :func:`emit` (its JSON report) and :func:`bar` (its progress bar).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sealstore.progress import Progress

__all__ = [
    "CommandFailed",
    "bar",
    "command",
    "emit",
    "group",
    "json_mode",
    "say",
    "store_options",
]


class CommandFailed(Exception):
    """A command that reported its findings and must still fail (damage found, problems left).

    Raised after the report, so that with --json the error object follows it
    with the same exit code a plain run returns.
    """

    def __init__(self, message: str, *, exit_code: int, kind: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


# Options that may come after the subcommand as well as before it. Their
# default is SUPPRESS: given after, they set the attribute; not given, they
# leave the top-level parser's value (default or given before) alone.
_QUIET = argparse.ArgumentParser(add_help=False)
_QUIET.add_argument(
    "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors on stderr"
)
_JSON = argparse.ArgumentParser(add_help=False)
_JSON.add_argument(
    "--json",
    action="store_true",
    default=argparse.SUPPRESS,
    help="report as one JSON object on stdout, errors as JSON on stderr (docs/CLI.md)",
)


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("threads must be at least 1")
    return n


def group(sub: Any, name: str, help: str, **kwargs: Any) -> Any:
    """A command that has actions (``keys init``, ``store gc``): returns their subparsers."""
    p = sub.add_parser(name, help=help, **kwargs)
    dest = name.replace("-", "_") + "_command"
    return p.add_subparsers(dest=dest, metavar="ACTION", required=True)


def command(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str | None = None,
    reports: bool = True,
    store: bool = False,
    threads: int | None = None,
    threads_help: str = "worker threads",
    progress: bool = False,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """Register one command that runs *func*.

    Args:
        sub: the subparsers to add it to (the top level's, or a :func:`group`'s).
        name: its name on the command line.
        func: what runs it; returns the exit code.
        help: the line in the parent's list; *description* the text of its --help.
        reports: it takes ``--json`` (its report and errors as JSON).
        store: it takes ``--store URL`` and ``--tenant T``.
        threads: it takes ``-t/--threads N``, with this default.
        threads_help: what the threads do, for --help.
        progress: it draws a progress bar, and takes ``--no-progress``.
        defaults: more attributes set on the parsed namespace.

    Returns:
        The command's parser, for its own arguments.
    """
    parents = [_QUIET, _JSON] if reports else [_QUIET]
    p = sub.add_parser(name, help=help, description=description or help, parents=parents)
    p.set_defaults(func=func, prog=p.prog, reports_json=reports, **defaults)
    if store:
        store_options(p)
    if threads is not None:
        p.add_argument(
            "-t",
            "--threads",
            type=_threads,
            default=threads,
            metavar="N",
            help=f"{threads_help} (default here: {threads})",
        )
    if progress:
        p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    return p


def store_options(p: argparse.ArgumentParser) -> None:
    """``--store URL`` and ``--tenant T``."""
    p.add_argument(
        "--store",
        metavar="URL",
        help="store URL: file://PATH, s3://BUCKET/PREFIX, memory://NAME "
        "(default: $SEALSTORE_STORE or file://$SEALSTORE_HOME/store)",
    )
    p.add_argument(
        "--tenant", metavar="T", help="tenant namespace (default: $SEALSTORE_TENANT or 'default')"
    )


def json_mode(args: argparse.Namespace) -> bool:
    """Whether the command was asked for JSON (``--json`` before or after its name)."""
    return bool(getattr(args, "json", False))


def say(args: argparse.Namespace, text: str) -> None:
    """A line for a person on stderr; none with ``-q`` or ``--json``."""
    if not (args.quiet or json_mode(args)):
        print(text, file=sys.stderr)


def emit(args: argparse.Namespace, report: dict[str, Any], *, stdout_is_data: bool = False) -> None:
    """Write *report*, the command's JSON object: on stdout, or stderr where stdout is data.

    Keys are sorted and the text is ASCII (``ensure_ascii``): no byte of a file
    name or a server's answer reaches the terminal unescaped.
    """
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    print(text, file=sys.stderr if stdout_is_data else sys.stdout)


def bar(args: argparse.Namespace, label: str, total: int | None) -> Progress:
    """The command's progress bar (a terminal only; none with -q, --json or --no-progress)."""
    quiet = args.quiet or json_mode(args) or getattr(args, "no_progress", False)
    return Progress(label, total, enabled=not quiet)
