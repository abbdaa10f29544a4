"""numba kernels (CPU and CUDA) for ChaCha20-Poly1305 and AES-GCM -- built in a later issue."""
