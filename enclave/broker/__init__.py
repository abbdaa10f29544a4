"""The key broker: attested key release over HTTPS (docs/BROKER.md).

* ``release``: the key-release protocol shared by the broker and its client (no web code).
* ``server``: the broker's decisions; ``http``: its FastAPI service; ``openapi``: its schema.
* ``config``, ``bundle``, ``reload``: the policy file, signed bundles, reloading at run time.
* ``state``, ``watch``: nonce and lift state, metrics and alerts. ``client``: the workload's side.

The broker imports attestation (one floor down); attestation never imports the broker.
"""
