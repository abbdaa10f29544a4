"""``sealstore bench``: what encryption costs on this machine, its storage and its GPUs.

The measuring code of the ``sealstore bench`` command and of the repository's
``benchmarks/`` scripts, one copy:

* :mod:`~sealstore.bench.timing` -- sizes, interleaved rounds and medians, the machine;
* :mod:`~sealstore.bench.aead`    -- the raw AEAD ceiling and the sealed file's operations;
* :mod:`~sealstore.bench.tensors` -- loading into CPU tensors against plaintext safetensors;
* :mod:`~sealstore.bench.gpu`     -- GPU-direct loads and the decrypt kernels;
* :mod:`~sealstore.bench.keys`    -- key release latency;
* :mod:`~sealstore.bench.peers`   -- CryptoTensors, tensorizer, Run:ai Model Streamer,
  fastsafetensors, where installed;
* :mod:`~sealstore.bench.artifact` -- a real artifact: storage and decryption apart;
* :mod:`~sealstore.bench.runner`  -- all of it in one run; :mod:`~sealstore.bench.table`
  prints it.

It sits above ``loaders/`` (it loads tensors with them) and below ``cli/``.
Nothing heavy is imported until a section runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchOptions", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sealstore.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'sealstore.bench' has no attribute {name!r}")
