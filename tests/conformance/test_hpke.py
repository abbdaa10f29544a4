"""The HPKE recipients run the provider conformance suite, with each KEM."""

from __future__ import annotations

import pytest

from sealstore.kms.hpke import HpkeRecipient, generate_identity
from tests.conformance.providers import ProviderConformance


class TestHpkeX25519(ProviderConformance):
    kind = "hpke"
    tells_tampering = True
    kem = "x25519"

    @pytest.fixture
    def identity(self, tmp_path):
        return generate_identity(tmp_path / "id.key", kem=self.kem)

    @pytest.fixture
    def wrapper(self, identity):
        return HpkeRecipient.from_uri(identity.recipient)

    @pytest.fixture
    def unwrapper(self, identity):
        return identity

    @pytest.fixture
    def other_unwrapper(self, tmp_path):
        return generate_identity(tmp_path / "other.key", kem=self.kem)


class TestHpkeMlkem768X25519(TestHpkeX25519):
    kem = "mlkem768x25519"
