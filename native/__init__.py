"""numba kernels: ChaCha20-Poly1305 on the CPU (``chacha``, ``aead``); AES-GCM and CUDA to come.

Nothing here is imported by the ground floor or the CLI at start-up: numba
costs ~0.5 s to import and the kernels compile on first use (cached on disk
afterwards). See docs/NATIVE.md.
"""
