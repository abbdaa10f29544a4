"""Attestation: evidence verification, no web code (docs/ATTESTATION.md).

* ``tpm`` / ``tpm_kek``: TPM 2.0 sealing under PCR policies; the ``tpm:`` key provider.
* ``tpm_quote``: the attestation key, quotes over PCRs, and their verifier.
* ``snp``, ``snp_crl``: AMD SEV-SNP reports, their VCEK chains and AMD's CRLs.
* ``tdx``, ``tdx_collateral``, ``tdx_pccs``: Intel TDX quotes, checked against Intel's
  TCB info, QE identity and CRLs, read from files or a PCCS.
* ``nvgpu``, ``nvgpu_rim``: NVIDIA GPU attestation reports and reference manifests.
* ``certs``: the X.509 checks they share. ``tsm``: evidence collection through configfs-tsm.
"""
