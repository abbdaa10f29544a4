"""The model store (artifacts, manifests, backups) -- built in a later issue."""
