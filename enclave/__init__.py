"""Attestation and attested key release -- built in a later issue."""
