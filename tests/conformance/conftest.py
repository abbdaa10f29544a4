"""Servers for the provider conformance suites, from the session's test services."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vault_servers(services: dict[str, str]) -> dict[str, dict[str, str]]:
    """The OpenBao dev servers: plain HTTP and TLS (with its CA file)."""
    token = services["vault_token"]
    return {
        "http": {"addr": services["vault_addr"], "token": token},
        "tls": {
            "addr": services["vault_tls_addr"],
            "token": token,
            "cacert": services["vault_cacert"],
        },
    }
