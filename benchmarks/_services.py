"""The test services (scripts/services.sh) for the benchmarks that need a real server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "services.sh"


def services(probe: str) -> tuple[dict[str, str], bool]:
    """The services' ``SEALSTORE_TEST_*`` endpoints, and whether this call started them.

    If *probe* (one of those variables) is already set, the services are taken
    to be up (``eval "$(scripts/services.sh env)"``); otherwise they are started.
    """
    if os.environ.get(probe):
        return dict(os.environ), False
    subprocess.run([str(SCRIPT), "start"], check=True)
    env_lines = subprocess.run([str(SCRIPT), "env"], check=True, capture_output=True, text=True)
    env = dict(os.environ)
    for line in env_lines.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'\"")
    if not env.get(probe):
        raise SystemExit(f"scripts/services.sh env printed no {probe}")
    return env, True


def stop() -> None:
    subprocess.run([str(SCRIPT), "stop"], check=False)
