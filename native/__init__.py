"""numba kernels: ChaCha20-Poly1305 and AES-GCM on the CPU (``chacha``, ``aes``, ``aead``)
and in CUDA (``cuda_chacha``, ``cuda_aes``).

Nothing here is imported by the ground floor or the CLI at start-up: numba
costs ~0.5 s to import and the kernels compile on first use (cached on disk
afterwards). ``sealstore.chunks.new_aead`` imports ``aead`` lazily for
ChaCha20-Poly1305 when ``SEALSTORE_AEAD=native``; the CPU AES here is a
table-driven reference and test oracle that no production path uses. See
docs/NATIVE.md.
"""
