"""Attestation and attested key release (docs/ATTESTATION.md, docs/BROKER.md).

Two rooms, one floor: ``attestation`` verifies evidence (TPM quotes and sealing,
SEV-SNP, TDX, NVIDIA GPUs); ``broker`` releases keys against it over HTTPS. The
broker imports attestation; attestation never imports the broker.
"""
