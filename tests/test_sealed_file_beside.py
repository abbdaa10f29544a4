"""The object digest hashed beside decryption; decrypted ciphertext leaving the resident set.

A store object whose every chunk authenticates but whose bytes are not the
ones the manifest signs -- what a holder of the version's key could seal --
must still be refused by every loader, now that the digest runs on a thread
beside the decryption instead of before it: nothing is returned and the
buffers decrypted into are wiped.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from sealstore.chunks import new_aead
from sealstore.errors import AuthenticationError
from sealstore.format import open_payload_key, read_preamble
from sealstore.kms.envelope import open_sealed, seal_file
from sealstore.kms.local import LocalKeyring
from sealstore.loaders import from_pretrained, load_file, safe_open
from sealstore.stream import SealedFile
from sealstore.vault.pull import hash_beside, unwrap_version_key
from sealstore.vault.store import Store
from tests.conftest import CS


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(300, 200, generator=g), "b": torch.randn(77, generator=g)}


def _substitute(store: Store, ref: str, path: str) -> None:
    """Re-seal the object of *ref*/*path* with one plaintext bit flipped, under its own key.

    Same header, same size, every chunk tag valid: only the object digest in
    the signed manifest can tell.
    """
    m = store.manifest(ref)
    entry = next(e for e in m.files if e.path == path)
    obj = Path(store.url[len("file://") :]) / store.object_path(m.tenant, entry.object)
    data = bytearray(obj.read_bytes())
    pre = read_preamble(io.BytesIO(data))
    dek = unwrap_version_key(m, pre)
    with SealedFile(bytes(data), dek, preamble=pre) as sf:
        i = sf.chunk_count - 1
        plain = bytearray(sf.layout.plain_len(i))
        sf.decrypt_chunk_into(i, plain)
        plain[-1] ^= 0x01
        aead = new_aead(pre.header.suite, open_payload_key(pre.header, dek))
        sealed = aead.encrypt(sf.chunk_nonce(i), bytes(plain), pre.aad)
        offset = sf.layout.offset(i)
    data[offset : offset + len(sealed)] = sealed
    obj.write_bytes(bytes(data))


@pytest.fixture
def pushed(store: Store, tmp_path: Path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    st_save_file(_tensors(), src / "model.safetensors")
    store.push(src, "m", keys=["local:"], chunk_size=CS)
    _substitute(store, "m:1", "model.safetensors")
    return f"sealstore+{store.url}#m"


def test_substituted_object_whose_chunks_all_authenticate_is_refused_by_load_file(
    pushed: str,
) -> None:
    with pytest.raises(AuthenticationError, match="object hash does not match"):
        load_file(pushed)


def test_substituted_object_is_refused_by_safe_open_with_check_digest(pushed: str) -> None:
    # safe_open parses the header on open: the digest is checked there.
    with pytest.raises(AuthenticationError, match="object hash does not match"):
        safe_open(pushed, check_digest=True)
    with safe_open(pushed) as f:  # lazy by default: chunk tags only, as documented
        assert f.get_tensor("b").shape == (77,)


def test_full_load_parses_the_header_without_waiting_for_the_check(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    from sealstore.loaders.st_header import Layout

    sealed = _sealed(ring, tmp_path)
    calls = []
    with open_sealed(sealed) as sf:
        sf.check_beside(lambda: calls.append(1))
        layout = Layout.before_full_read(sf)
        assert sorted(layout.entries) == ["a", "b"]
        assert calls == []  # still pending: the full read runs it
        got = load_file(sf, threads=2)
        assert calls == [1]
    assert torch.equal(got["a"], _tensors()["a"])


def test_substituted_shard_is_refused_by_from_pretrained(store: Store, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    plain = tmp_path / "bert"
    BertModel(config).save_pretrained(plain, max_shard_size="40KB")
    store.push(plain, "bert", keys=["local:"], chunk_size=CS)
    m = store.manifest("bert:1")
    shards = sorted(f.path for f in m.files if f.path.endswith(".safetensors"))
    assert len(shards) > 2
    assert from_pretrained(f"sealstore+{store.url}#bert") is not None
    _substitute(store, "bert:1", shards[1])
    with pytest.raises(AuthenticationError, match="object hash does not match"):
        from_pretrained(f"sealstore+{store.url}#bert")


def _sealed(ring: LocalKeyring, tmp_path: Path) -> Path:
    plain = tmp_path / "model.safetensors"
    st_save_file(_tensors(), plain)
    sealed = tmp_path / "model.safetensors.seal"
    seal_file(plain, sealed, ["local:"], chunk_size=CS)
    return sealed


def test_failed_check_beside_wipes_what_was_decrypted_and_keeps_failing(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    sealed = _sealed(ring, tmp_path)
    calls = []

    def check() -> None:
        calls.append(1)
        raise AuthenticationError("object hash does not match")

    with open_sealed(sealed) as sf:
        sf.check_beside(check)
        buf = bytearray(b"\xaa") * sf.size
        with pytest.raises(AuthenticationError):
            sf.read_into(0, buf, threads=2)
        assert buf == bytes(len(buf))  # decrypted, then wiped
        with pytest.raises(AuthenticationError):
            next(iter(sf.iter_chunks()))
        with pytest.raises(AuthenticationError):
            sf.decrypt_chunk_into(0, bytearray(CS))
        assert len(calls) == 3

    passed = []
    with open_sealed(sealed) as sf:
        sf.check_beside(lambda: passed.append(1))
        whole = sf.read_range(0, sf.size)
        assert sf.read_range(0, 10) == whole[:10]
        assert passed == [1]  # once passed, not run again


def test_digest_thread_reads_its_own_descriptor(store: Store, tmp_path: Path) -> None:
    """Closing the loader's file while the hash runs does not disturb the hash."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(3 * CS + 5))
    store.push(src, "w", keys=["local:"], chunk_size=CS)
    m = store.manifest("w:1")
    entry = m.files[0]
    obj = Path(store.url[len("file://") :]) / store.object_path(m.tenant, entry.object)
    fp = open(obj, "rb")  # noqa: SIM115
    check = hash_beside(store, m, entry, fp)
    fp.close()
    check()  # the digest matches: it was read through a descriptor of its own


def _mapped_rss_kib(path: Path) -> int:
    """The resident KiB of this process's mappings of *path* (0 when it is not mapped)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_full_read_of_a_mapped_file_leaves_its_ciphertext_out_of_the_resident_set(
    ring: LocalKeyring, tmp_path: Path
) -> None:
    plain = tmp_path / "big.safetensors"
    tensors = {"w": torch.randn(1 << 20, generator=torch.Generator().manual_seed(2))}
    st_save_file(tensors, plain)
    sealed = tmp_path / "big.safetensors.seal"
    seal_file(plain, sealed, ["local:"], chunk_size=CS)
    for threads in (1, 2):
        with open_sealed(sealed) as sf:  # a path: memory-mapped
            got = load_file(sf, threads=threads)
            # What is left resident: the preamble's page and the final chunk,
            # read on its own to check the length -- not the 4 MiB just decrypted.
            assert _mapped_rss_kib(sealed) <= CS // 1024 + 16
        assert torch.equal(got["w"], tensors["w"])
