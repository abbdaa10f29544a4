"""numba kernels: ChaCha20-Poly1305 and AES-GCM on the CPU (``chacha``, ``aes``, ``aead``)
and in CUDA (``cuda_chacha``, ``cuda_aes``).

Nothing here is imported by the ground floor or the CLI at start-up: numba
costs ~0.5 s to import and the kernels compile on first use (cached on disk
afterwards). ``sealstore.chunks.new_aead`` imports ``aead`` lazily when
``SEALSTORE_AEAD=native``. See docs/NATIVE.md.
"""
