"""``sealstore broker ...`` and ``sealstore lockdown``: the broker and its kill switch."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from sealstore.cli.commands import command, emit, group, json_mode

__all__ = ["register"]


def register(sub: Any) -> None:
    bsub = group(sub, "broker", "the key-release broker (attested key release)")

    serve = command(
        bsub,
        "serve",
        _serve,
        reports=False,
        help="run the broker (HTTPS) with a config file",
        description="Serve attested key release over TLS: challenge, evidence, policy, the "
        "DEK sealed to the workload's ephemeral key. Decisions are logged on stderr; "
        "callers get only a refusal code. The config format is in docs/BROKER.md.",
    )
    serve.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML config")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--bundle-key",
        type=Path,
        metavar="PEM",
        help="the Ed25519 public key bundles must be signed with, pinned outside the config "
        "(default: $SEALSTORE_BROKER_BUNDLE_KEY, a PEM file): a config it did not sign is "
        "refused, whatever its signing: says",
    )
    serve.add_argument(
        "--allow-bundle-key-change",
        action="store_true",
        help="start although the audit log shows the last config in force signed by another "
        "key (or signed, and this one is not); the override is recorded in the audit log",
    )

    check = command(bsub, "check", _check, help="check a config file and print what it releases")
    check.add_argument("--config", required=True, type=Path, metavar="FILE")

    schema = command(
        bsub,
        "schema",
        _schema,
        reports=False,
        help="print the config file's JSON Schema (for editors: docs/BROKER.md)",
    )
    schema.add_argument("-o", "--output", default="-", metavar="FILE")

    sign = command(
        bsub,
        "sign",
        _sign,
        help="sign a config and the files it names (FILE.sig) with an Ed25519 key",
        description="Write FILE.sig beside the config: one Ed25519 signature over the "
        "SHA-256 of the config and of every file it names outside server: (reference files, "
        "AKs). A broker that pins the public key (signing.public_key) loads or reloads only "
        "a bundle signed so, with a serial above the one it runs. The key: a PEM PKCS#8 "
        "Ed25519 private key (openssl genpkey -algorithm ed25519); if encrypted, its "
        "passphrase in $SEALSTORE_BUNDLE_PASSPHRASE.",
    )
    sign.add_argument("--config", required=True, type=Path, metavar="FILE")
    sign.add_argument("--key", required=True, type=Path, metavar="KEY", help="private key PEM")
    sign.add_argument(
        "--serial", type=int, metavar="N", help="its serial (default: the last one's + 1, or 1)"
    )

    command(
        bsub,
        "token",
        _token,
        reports=False,
        help="make a bearer token; prints it and the token_sha256 line for the config",
    )

    lock = command(
        sub,
        "lockdown",
        _lockdown,
        help="kill switch: refuse every key release of a tenant (or all) at once",
        description="sealstore lockdown --tenant T | --all  stops every release at once, on "
        "every replica; 'lockdown lift' ends it (or an identity's lockout: --identity NAME); "
        "'lockdown status' lists what is in force. Through a broker's admin API (--broker URL, "
        "an admin's token; callers on the broker's host unless admin.remote is on) or "
        "straight to the replicas' shared Redis state (--config FILE, on an operator's host).",
    )
    lock.add_argument(
        "action",
        nargs="?",
        choices=("lift", "status"),
        help="lift or status (none: declare a lockdown)",
    )
    scope = lock.add_mutually_exclusive_group()
    scope.add_argument("--tenant", metavar="T", help="this tenant")
    scope.add_argument("--all", action="store_true", help="every tenant")
    scope.add_argument("--identity", metavar="NAME", help="(lift) end this identity's lockout")
    lock.add_argument("--reason", default="", help="why (goes to the audit log and alerts)")
    where = lock.add_mutually_exclusive_group(required=True)
    where.add_argument("--broker", metavar="URL", help="https://HOST:PORT of a broker")
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the brokers' config file (its state.url must be the shared Redis)",
    )
    lock.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="an admin identity's bearer token (default: $SEALSTORE_BROKER_TOKEN "
        "or $SEALSTORE_BROKER_TOKEN_FILE)",
    )


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from sealstore.enclave.broker.config import BUNDLE_KEY_ENV, BrokerConfig, load_bundle_key
    from sealstore.enclave.broker.http import serve

    pinned = args.bundle_key or os.environ.get(BUNDLE_KEY_ENV) or None
    bundle_key = load_bundle_key(pinned) if pinned else None

    def load() -> BrokerConfig:  # at start, and again on every reload
        config = BrokerConfig.load(args.config, bundle_key=bundle_key)
        config = dataclasses.replace(config, allow_bundle_key_change=args.allow_bundle_key_change)
        return config if args.port is None else dataclasses.replace(config, port=args.port)

    serve(load(), load=load)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from sealstore.docmodel import write_schema
    from sealstore.enclave.broker.config import json_schema

    write_schema(json_schema(), args.output)
    return 0


def _check(args: argparse.Namespace) -> int:
    from sealstore.enclave.broker.config import BrokerConfig

    config = BrokerConfig.load(args.config)
    if json_mode(args):
        emit(args, _check_report(config))
        return 0
    mtls = "client certificates" + (" (required)" if config.require_client_cert else "")
    print(
        f"{config.path}: ok; https://{config.host}:{config.port}, "
        f"{mtls if config.client_ca else 'bearer tokens only'}"
    )
    for warning in config.warnings:
        print(f"  warning: {warning}")
    for tenant in config.tenants.values():
        for name, rule in sorted(tenant.artifacts.items()):
            who = ", ".join(sorted(rule.identities))
            print(f"  {tenant.name}/{name}: to {who} on {', '.join(rule.evidence)} evidence")
    for ident in config.identities.values():
        roles = ", ".join(f"{t}={r}" for t, r in sorted(ident.roles.items())) or "none"
        ends = sorted(
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.not_after))
            for t in ident.tokens
            if t.not_after is not None
        )
        never = sum(t.not_after is None for t in ident.tokens)
        toks = [f"token until {e}" for e in ends] + ["token with no end"] * never
        print(f"  identity {ident.name}: {roles}" + (f"; {', '.join(toks)}" if toks else ""))
    signed = f"signed bundle, serial {config.bundle_serial}" if config.bundle_serial else "unsigned"
    print(
        f"  policy: {len(config.sources)} file(s), digest {config.digest[:16]}, {signed}; "
        f"reload on SIGHUP"
        + (f" and on a change (every {config.reload_interval:g} s)" if config.reload_watch else "")
    )
    print(
        f"  state: {config.state_url or 'in-process (one replica)'}; audit log: "
        f"{config.audit_log}; admin API: {'remote' if config.admin_remote else 'local only'}"
        f"; alerts: {config.webhook or 'log and metrics only'}"
    )
    return 0


def _check_report(config: Any) -> dict[str, Any]:
    """What ``broker check --json`` reports: where it serves and what it releases to whom."""
    return {
        "config": str(config.path),
        "url": f"https://{config.host}:{config.port}",
        "client_ca": config.client_ca is not None,
        "require_client_cert": bool(config.require_client_cert),
        "warnings": list(config.warnings),
        "releases": [
            {
                "tenant": t.name,
                "artifact": name,
                "identities": sorted(rule.identities),
                "evidence": list(rule.evidence),
            }
            for t in config.tenants.values()
            for name, rule in sorted(t.artifacts.items())
        ],
        "identities": {i.name: dict(i.roles) for i in config.identities.values()},
        "policy": {
            "files": len(config.sources),
            "digest": config.digest,
            "bundle_serial": config.bundle_serial,
            "reload_watch": bool(config.reload_watch),
        },
        "state": "shared" if config.state_url is not None else "in-process",
        "admin_remote": bool(config.admin_remote),
    }


def _sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealstore.enclave.broker.bundle import key_id, read_serial, sign_bundle
    from sealstore.enclave.broker.config import BrokerConfig

    secret = os.environ.get("SEALSTORE_BUNDLE_PASSPHRASE")
    try:
        key = serialization.load_pem_private_key(
            args.key.read_bytes(), None if secret is None else secret.encode()
        )
    except (TypeError, ValueError) as exc:
        # Not the exception's text: it could quote the key file.
        why = (
            "encrypted: set SEALSTORE_BUNDLE_PASSPHRASE"
            if "encrypted" in str(exc)
            else ("not a PEM private key, or a wrong passphrase")
        )
        raise ValueError(f"--key {args.key}: {why}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"--key {args.key}: not an Ed25519 key")
    config = BrokerConfig.load(args.config, verify=False)
    previous = read_serial(config.signature_path)
    serial = args.serial if args.serial is not None else (previous or 0) + 1
    signed = sign_bundle(config, key, serial)
    tmp = config.signature_path.with_name(config.signature_path.name + ".tmp")
    tmp.write_bytes(signed)
    os.replace(tmp, config.signature_path)  # a watching broker never sees half a signature
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    other = config.signing_key is not None and config.signing_key != public
    if json_mode(args):
        emit(
            args,
            {
                "signature": str(config.signature_path),
                "serial": serial,
                "files": len(config.sources),
                "key": key_id(public),
                "pinned_key_differs": other,
            },
        )
        return 0
    print(
        f"{config.signature_path}: serial {serial}, {len(config.sources)} file(s), "
        f"key {key_id(public)[:16]}"
    )
    if other:
        print(
            "  warning: signing.public_key in this config is another key: brokers will "
            "refuse this signature"
        )
    return 0


def _token(_args: argparse.Namespace) -> int:
    value = secrets.token_urlsafe(32)
    print(value)
    print(f"token_sha256: {hashlib.sha256(value.encode()).hexdigest()}")
    return 0


def _lockdown(args: argparse.Namespace) -> int:
    action = args.action or "lockdown"
    scope = "*" if args.all else args.tenant
    if args.identity is not None and action != "lift":
        raise ValueError("--identity goes with 'lockdown lift'")
    if action != "status" and scope is None and args.identity is None:
        raise ValueError(
            "name --tenant T or --all" + (" or --identity NAME" if action == "lift" else "")
        )
    out = _by_config(args, action, scope) if args.config else _by_api(args, action, scope)
    downs, outs = out.get("lockdowns", {}), out.get("lockouts", {})
    if json_mode(args):
        emit(args, {"action": action, "lockdowns": downs, "lockouts": outs})
        return 0
    for what, reason in sorted(downs.items()):
        print(f"lockdown {'all tenants' if what == '*' else what}: {reason}")
    for who, reason in sorted(outs.items()):
        print(f"locked out {who}: {reason}")
    if not downs and not outs:
        print("no lockdown or lockout in force")
    return 0


def _by_config(args: argparse.Namespace, action: str, scope: str | None) -> dict[str, Any]:
    """Straight to the shared state: the operator on this host acts as an admin of all."""
    import dataclasses

    from sealstore.enclave.broker.config import BrokerConfig, Identity
    from sealstore.enclave.broker.server import Broker

    config = BrokerConfig.load(args.config)
    if config.state_url is None:
        raise ValueError(
            f"{args.config}: the broker keeps its state in its own process (no state.url); "
            "use --broker URL"
        )
    me = f"operator:{getpass.getuser()}@{socket.gethostname()}"
    stream = f"admin-{socket.gethostname()}"
    broker = Broker(dataclasses.replace(config, audit_stream=stream))
    ident = Identity(name=me, token_sha256=None, roles={"*": "admin"})
    broker.state.ping()
    if action == "status":
        return broker.status(ident)
    if action == "lift":
        return broker.lift(ident, scope, identity=args.identity)
    return broker.lockdown(ident, scope, args.reason)


def _by_api(args: argparse.Namespace, action: str, scope: str | None) -> dict[str, Any]:
    from urllib.parse import urlsplit

    from sealstore.enclave.broker.client import bearer_token, client_context, https_json
    from sealstore.errors import BackendError, KeyReleaseDenied

    parts = urlsplit(args.broker)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--broker {args.broker!r}: expected https://HOST:PORT")
    # The same credentials as a workload's broker+https: keys, or --token-file.
    given = args.token_file.read_text(encoding="utf-8").strip() if args.token_file else None
    token = bearer_token(given)
    env = os.environ.get
    ctx = client_context(
        env("SEALSTORE_BROKER_CACERT"), env("SEALSTORE_BROKER_CERT"), env("SEALSTORE_BROKER_KEY")
    )
    body: dict[str, Any] | None = None
    if action != "status":
        body = (
            {"identity": args.identity}
            if args.identity
            else ({"all": True} if scope == "*" else {"tenant": scope})
        )
        if args.reason:
            body["reason"] = args.reason
    path = {
        "lockdown": "/v1/admin/lockdown",
        "lift": "/v1/admin/lift",
        "status": "/v1/admin/status",
    }[action]
    status, obj = https_json(
        parts.hostname, parts.port or 443, ctx, "GET" if body is None else "POST", path, body, token
    )
    if status == 200 and isinstance(obj, dict):
        return obj
    code = obj.get("error") if isinstance(obj, dict) else None
    if status in (401, 403) and code:
        raise KeyReleaseDenied(f"broker {args.broker} refused {action}: {code}")
    raise BackendError(
        f"broker {args.broker} answered {status} to {path}" + (f" ({code})" if code else "")
    )
