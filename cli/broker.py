"""``sealstore broker ...``: the key-release broker."""

from __future__ import annotations

import argparse
import hashlib
import secrets
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    broker = sub.add_parser("broker", help="the key-release broker (attested key release)")
    bsub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    serve = bsub.add_parser(
        "serve",
        help="run the broker (HTTPS) with a config file",
        description="Serve attested key release over TLS: challenge, evidence, policy, the "
        "DEK sealed to the workload's ephemeral key. Decisions are logged on stderr; "
        "callers get only a refusal code. The config format is in docs/BROKER.md.",
    )
    serve.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML config")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=_serve)

    check = bsub.add_parser("check", help="check a config file and print what it releases")
    check.add_argument("--config", required=True, type=Path, metavar="FILE")
    check.set_defaults(func=_check)

    token = bsub.add_parser(
        "token",
        help="make a bearer token; prints it and the token_sha256 line for the config",
    )
    token.set_defaults(func=_token)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    from sealstore.enclave.broker_config import BrokerConfig
    from sealstore.enclave.broker_http import serve

    config = BrokerConfig.load(args.config)
    if args.port is not None:
        config = dataclasses.replace(config, port=args.port)
    serve(config)
    return 0


def _check(args: argparse.Namespace) -> int:
    from sealstore.enclave.broker_config import BrokerConfig

    config = BrokerConfig.load(args.config)
    mtls = "client certificates" + (" (required)" if config.require_client_cert else "")
    print(f"{config.path}: ok; https://{config.host}:{config.port}, "
          f"{mtls if config.client_ca else 'bearer tokens only'}")  # fmt: skip
    for warning in config.warnings:
        print(f"  warning: {warning}")
    for tenant in config.tenants.values():
        for name, rule in sorted(tenant.artifacts.items()):
            who = ", ".join(sorted(rule.identities))
            print(f"  {tenant.name}/{name}: to {who} on {', '.join(rule.evidence)} evidence")
    return 0


def _token(_args: argparse.Namespace) -> int:
    value = secrets.token_urlsafe(32)
    print(value)
    print(f"token_sha256: {hashlib.sha256(value.encode()).hexdigest()}")
    return 0
