"""The built-in providers run the conformance suite."""

from __future__ import annotations

import warnings

import pytest
from nacl import pwhash

from sealstore.kms.local import LocalKeyring, create_keyring
from sealstore.kms.x25519 import X25519Recipient, generate_identity
from tests.conformance.providers import ProviderConformance

CHEAP = {"opslimit": pwhash.argon2id.OPSLIMIT_MIN, "memlimit": pwhash.argon2id.MEMLIMIT_MIN}


@pytest.fixture(autouse=True)
def _fresh_keyring_cache():
    LocalKeyring._cache.clear()
    yield
    LocalKeyring._cache.clear()


class TestLocalKeyring(ProviderConformance):
    kind = "local"
    tells_tampering = True

    @pytest.fixture
    def wrapper(self, tmp_path):
        return create_keyring(tmp_path / "ring.json", passphrase="correct horse", **CHEAP)

    @pytest.fixture
    def unwrapper(self, wrapper):
        return wrapper

    @pytest.fixture
    def other_unwrapper(self, tmp_path):
        return create_keyring(tmp_path / "other.json", passphrase="correct horse", **CHEAP)


class TestLocalKeyringReopened(TestLocalKeyring):
    """The unwrapper is the keyring opened anew from disk, unlocked by the env passphrase."""

    @pytest.fixture
    def unwrapper(self, wrapper, monkeypatch):
        monkeypatch.setenv("SEALSTORE_PASSPHRASE", "correct horse")
        LocalKeyring._cache.clear()
        return LocalKeyring.open(wrapper.path)


class TestInsecureKeyring(TestLocalKeyring):
    @pytest.fixture
    def wrapper(self, tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_keyring(tmp_path / "ring.json", insecure_no_passphrase=True)


class TestX25519(ProviderConformance):
    kind = "x25519"
    tells_tampering = True

    @pytest.fixture
    def identity(self, tmp_path):
        return generate_identity(tmp_path / "id.key")

    @pytest.fixture
    def wrapper(self, identity):
        return X25519Recipient.from_uri(identity.recipient)

    @pytest.fixture
    def unwrapper(self, identity):
        return identity

    @pytest.fixture
    def other_unwrapper(self, tmp_path):
        return generate_identity(tmp_path / "other.key")
