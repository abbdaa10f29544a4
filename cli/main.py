"""Entry point: argument parsing, error-to-exit-code mapping, one-line errors.

Exit codes (also in docs/CLI.md):

  0  success
  1  authentication failed: tampered, truncated, or the wrong key
  2  usage error: bad arguments or options
  3  malformed input: not a sealed file, or a version/suite this release cannot read
  4  no key: no slot could be unwrapped, or a key service refused release
  5  not found, or an I/O error on a named file
  6  a storage or key backend failed
  7  attestation failed
  8  refused by policy: the store is in safe mode and the version is not known-good
  10 any other sealstore error, or an internal error (SEALSTORE_DEBUG=1 shows the traceback)
  129 terminated by SIGHUP (cleaned up as for Ctrl-C)
  130 interrupted
  141 the output pipe closed before the end (e.g. ``| head``)
  143 terminated by SIGTERM (``docker stop``, Kubernetes, ``timeout``; cleaned up as for Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from sealstore import errors
from sealstore.cli.commands import CommandFailed

__all__ = ["EXIT_CODES", "main", "printable"]

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.AuthenticationError, 1),
    (errors.FormatError, 3),  # includes UnsupportedVersion
    (errors.KeyUnavailable, 4),
    (errors.KeyReleaseDenied, 4),
    (errors.NotFound, 5),
    (errors.BackendError, 6),
    (errors.AttestationError, 7),
    (errors.Refused, 8),
    (errors.SealstoreError, 10),
    (FileNotFoundError, 5),
    (FileExistsError, 5),
    (IsADirectoryError, 5),
    (PermissionError, 5),
    (OSError, 5),
    (ValueError, 2),
    (ImportError, 2),
]


# Set by main() from the raw arguments: a usage error is found before there
# is a namespace to ask whether --json was given.
_json_errors = False


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (exit 2); with --json, a JSON object."""

    def error(self, message: str) -> NoReturn:
        # prog is "sealstore" or "sealstore keys init": the line already starts
        # with "sealstore:", so name only the subcommand, and where --help is.
        sub = self.prog.partition(" ")[2]
        where = f"{sub}: " if sub else ""
        text = f"{where}{printable(message)} (see {self.prog} --help)"
        if _json_errors:
            self.exit(2, _error_json("UsageError", text, 2) + "\n")
        self.exit(2, f"sealstore: error: {text}\n")


def _error_json(kind: str, message: str, code: int) -> str:
    """The one-line JSON error object of ``--json`` (documented in docs/CLI.md)."""
    return json.dumps({"error": {"type": kind, "message": message, "exit_code": code}})


def build_parser() -> argparse.ArgumentParser:
    from sealstore.cli import audit, backup, bench, broker, completion, files, keys, store, tpm

    parser = _Parser(
        prog="sealstore",
        description="Sealed model artifacts: encrypt and decrypt files; push, pull and "
        "manage versions in a signed, tenant-separated store.",
        epilog="Exit codes: 0 ok, 1 authentication failed, 2 usage, 3 malformed input, "
        "4 no key, 5 not found / I/O, 6 backend, 7 attestation, 8 refused (safe mode), "
        "10 other, 130 interrupted, 141 output pipe closed early, 143/129 SIGTERM/SIGHUP.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    parser.add_argument(
        "--json",
        action="store_true",
        help="the command's report as one JSON object on stdout, errors as JSON on stderr",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (keys, files, store, tpm, broker, backup, audit, bench, completion):
        module.register(sub)
    return parser


def _version() -> str:
    import sealstore

    return f"sealstore {sealstore.__version__}"


def _kind(exc: BaseException) -> str:
    """The error's type for --json: sealstore's own class, or the built-in's."""
    if isinstance(exc, errors.SealstoreError) or type(exc).__module__ == "builtins":
        return type(exc).__name__
    for cls, _ in EXIT_CODES:  # a library's subclass: named by the class it is handled as
        if isinstance(exc, cls):
            return cls.__name__
    return "Error"


def _say_text(kind: str, message: str, code: int, prefix: str = "sealstore: error: ") -> None:
    print(f"{prefix}{message}", file=sys.stderr)


def _say_json(kind: str, message: str, code: int, prefix: str = "") -> None:
    print(_error_json(kind, message, code), file=sys.stderr)


def _exit_code(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 10


# Unicode's bidirectional controls reorder what a terminal shows (the "Trojan
# Source" trick): escaped with the C0/C1 controls, though they are format
# characters, not controls.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI:
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def printable(text: object) -> str:
    """*text* safe to write to a terminal: every control character escaped.

    Slot key ids, contexts, file names and audit records come from files and
    servers nobody authenticated yet; written raw, an escape sequence in one
    could retitle the terminal, hide lines or fake output. C0 and C1 controls,
    DEL, line/paragraph separators and bidirectional overrides become
    ``\\xNN`` / ``\\uNNNN``; plain spaces and printable text are left alone.

    Args:
        text: anything; it is converted with ``str()``.

    Returns:
        The escaped text.
    """
    s = str(text)
    if s.isprintable():  # the common case: nothing to escape
        return s
    return "".join(_escape(ch) for ch in s)


class _EscapingStream:
    """A text stream that escapes every control character written to it.

    Installed over ``sys.stdout`` and ``sys.stderr`` for the life of a
    command, so no table, list or message can pass a file's or a server's
    escape sequence to the terminal, whichever ``print`` forgot to call
    :func:`printable`. Line ends and tabs (the tables' separators) pass;
    binary output goes through ``.buffer``, untouched; a progress bar's
    ``\\r`` goes through :meth:`write_control`.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        lines = ("\t".join(map(printable, line.split("\t"))) for line in text.split("\n"))
        self._inner.write("\n".join(lines))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def write_control(self, text: str) -> int:
        """Write *text* as it is: our own control characters (a progress bar's ``\\r``)."""
        return self._inner.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _EscapingFormatter(logging.Formatter):
    """Warnings as one escaped line: they can quote paths and key ids from files."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _JsonFormatter(logging.Formatter):
    """With --json, a warning is a JSON line on stderr, like the error object."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"warning": " ".join(record.getMessage().split())})


def _warning_handler(*, json_lines: bool = False) -> logging.Handler:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_EscapingFormatter("sealstore: warning: %(message)s"))
    return handler


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc.__class__.__name__}"
    else:
        text = " ".join(str(exc).split()) or exc.__class__.__name__
    return printable(text)


def _wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the options (not after ``--``, where it would be a file name)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    global _json_errors
    argv = sys.argv[1:] if argv is None else list(argv)
    _json_errors = _wants_json(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not getattr(args, "reports_json", False):
        parser.error(f"--json: '{args.prog}' writes no report to put in JSON")
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING,
        handlers=[_warning_handler(json_lines=args.json)],
    )
    logging.captureWarnings(True)
    from sealstore.kms.envelope import configure_cache

    configure_cache(None)  # one command, one unwrap per file: no key material kept around
    warnings.simplefilter("default")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _EscapingStream(out), _EscapingStream(err)  # type: ignore[assignment]
    restore: Callable[[], None] = lambda: None  # noqa: E731
    say = _say_json if args.json else _say_text
    try:
        # Inside the try: a SIGTERM the moment the handler is in place is
        # answered like any other (exit 143), not with a traceback.
        restore = _catch_termination()
        return int(args.func(args) or 0)
    except errors.Terminated as exc:
        name = signal.Signals(exc.signum).name
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            say("Terminated", f"terminated ({name})", 128 + exc.signum, "sealstore: ")
        return 128 + exc.signum
    except KeyboardInterrupt:
        say("Interrupted", "interrupted", 130, "sealstore: ")
        return 130
    except BrokenPipeError:
        # The reader of our output went away. What it got may be a prefix of a
        # stream whose end was never authenticated: never report success.
        _silence_stdout()
        say("BrokenPipe", "output pipe closed before the end", 141)
        return 141
    except CommandFailed as exc:
        say(exc.kind, _describe(exc), exc.exit_code)
        return exc.exit_code
    except Exception as exc:
        code = _exit_code(exc)
        if code == 10 and not isinstance(exc, errors.SealstoreError):
            # A bug in sealstore: one line, the traceback only on request.
            if os.environ.get("SEALSTORE_DEBUG"):
                traceback.print_exc()
            say(
                "InternalError",
                f"{exc.__class__.__name__}: {_describe(exc)} "
                "(set SEALSTORE_DEBUG=1 for the traceback)",
                10,
                "sealstore: internal error: ",
            )
            return 10
        say(_kind(exc), _describe(exc), code)
        return code
    finally:
        sys.stdout, sys.stderr = out, err
        restore()


def _catch_termination() -> Callable[[], None]:
    """SIGTERM and SIGHUP raise ``Terminated`` in the main thread, so they clean up like Ctrl-C.

    By default they kill the process on the spot, leaving temporary
    plaintext behind. Only the first signal raises: a second one (a
    supervisor that repeats itself) must not cut the cleanup of the first
    short. A signal the parent set to be ignored (``nohup``) stays ignored.

    Returns:
        A function that puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise errors.Terminated(signum)

    previous: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    stop_nudging, renudge = _nudge_main_thread(fired, set(previous))
    hook = sys.unraisablehook

    def swallowed(unraisable: Any) -> None:
        # The handler ran inside a __del__ (a SealedFile dropped between two
        # files of a pull): Python prints the Terminated and carries on, and the
        # main thread then blocks on the next read for ever -- the signal was
        # spent. Arm it again: the watcher re-sends it to the main thread.
        if isinstance(unraisable.exc_value, errors.Terminated) and fired:
            renudge(fired.pop())
        else:
            hook(unraisable)

    if previous:
        sys.unraisablehook = swallowed

    def restore() -> None:
        if sys.unraisablehook is swallowed:
            sys.unraisablehook = hook
        stop_nudging()
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    return restore


_NUDGE_EVERY = 0.2  # seconds


def _nudge_main_thread(
    fired: list[int], watched: set[int]
) -> tuple[Callable[[], None], Callable[[int], None]]:
    """Make sure a caught SIGTERM/SIGHUP reaches its Python handler promptly.

    Python runs a handler in the main thread at its next bytecode. A signal
    that lands just before the main thread enters a blocking read (a FIFO,
    a pipe, a socket) does not interrupt that read, so the handler waits --
    for ever, if no more input comes (seen: ``decrypt`` of a FIFO ignoring
    SIGTERM about one time in ten). The signal's number is written to a
    wakeup pipe; a watcher thread, which never takes these signals itself,
    sends it again to the main thread every 0.2 s until the handler has run:
    that one interrupts the read. The handler raises only once, so a
    repeat that arrives after it is harmless.

    Returns:
        A function that stops the watcher and puts the previous wakeup fd back,
        and one that has the watcher send a signal again (a handler whose
        exception was swallowed: it must run once more).
    """
    if not watched:
        return (lambda: None), (lambda signum: None)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        return (lambda: None), (lambda signum: None)
    main = threading.main_thread().ident
    done = threading.Event()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {*watched, signal.SIGINT})
        try:
            while not done.is_set():
                got = os.read(r, 64)
                if not got:
                    return  # the write end was closed: stopped
                pending = watched & set(got)
                while pending and not fired and not done.wait(_NUDGE_EVERY):
                    signal.pthread_kill(main, next(iter(pending)))  # type: ignore[arg-type]
        finally:
            os.close(r)

    threading.Thread(target=watch, name="sealstore-signals", daemon=True).start()

    def stop() -> None:
        done.set()
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(old)
        os.close(w)  # ends the watcher's read

    def again(signum: int) -> None:
        if done.is_set():
            return  # stopped: w is closed (and its number may be another file's now)
        with contextlib.suppress(OSError):  # stopped, or the pipe is full of it already
            os.write(w, bytes([signum]))

    return stop, again


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
