"""Attestation and attested key release (docs/ATTESTATION.md).

* ``tpm`` / ``tpm_kek``: TPM 2.0 sealing under PCR policies; the ``tpm:`` key provider.
* ``tpm_quote``: the attestation key, quotes over PCRs, and their verifier.
* ``snp``, ``tdx``: AMD SEV-SNP report and Intel TDX quote verification; ``certs``
  holds the X.509 checks they share; ``tdx_collateral`` checks a TDX quote against
  Intel's TCB info, QE identity and CRLs, which ``tdx_pccs`` reads from files or a PCCS.
* ``tsm``: evidence collection through Linux configfs-tsm.
"""
