"""The conformance suite every key provider runs.

A provider's test module subclasses :class:`ProviderConformance` and supplies
three fixtures: ``wrapper`` (wraps to the key under test), ``unwrapper``
(opens its slots) and ``other_unwrapper`` (an unwrapper of the same kind that
holds a different key). Later providers (Vault Transit, AWS KMS, TPM) run the
same tests against their real servers.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from sealstore import AuthenticationError, KeyUnavailable
from sealstore.format import parse_preamble
from sealstore.keys import DataKey, KeySlot, Unwrapper, Wrapper, unwrap_first
from sealstore.kms.envelope import open_sealed, seal_stream, unwrap_dek
from sealstore.kms.rotate import rotate_slots

CONTEXT = {"tenant": "t1", "artifact": "model", "path": "weights.safetensors"}


class ProviderConformance:
    kind: str = ""
    # A provider that holds the slot's key and checks the slot itself (a local
    # keyring, an x25519 identity) tells "this slot or its context changed"
    # (AuthenticationError) from "no key here" (KeyUnavailable); a key service's
    # answer does not tell them apart, so those read as KeyUnavailable.
    tells_tampering: bool = False

    @property
    def altered(self) -> type[Exception]:
        return AuthenticationError if self.tells_tampering else KeyUnavailable

    def test_protocols(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        assert isinstance(wrapper, Wrapper)
        assert isinstance(unwrapper, Unwrapper)
        assert wrapper.key_id

    def test_round_trip(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        dek = DataKey.generate()
        slot = wrapper.wrap(dek, CONTEXT)
        assert slot.kind == self.kind
        assert slot.key_id == wrapper.key_id
        with unwrapper.unwrap(slot, CONTEXT) as back:
            assert back.material() == dek.material()

    def test_each_wrap_is_fresh(self, wrapper: Wrapper) -> None:
        dek = DataKey.generate()
        assert wrapper.wrap(dek, CONTEXT).blob != wrapper.wrap(dek, CONTEXT).blob

    def test_slot_json_round_trip(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        dek = DataKey.generate()
        slot = wrapper.wrap(dek, CONTEXT)
        again = KeySlot.from_json(json.loads(json.dumps(slot.to_json())))
        assert again == slot
        assert unwrapper.unwrap(again, CONTEXT).material() == dek.material()

    def test_no_key_material_in_slot(self, wrapper: Wrapper) -> None:
        dek = DataKey.generate()
        raw = dek.material()
        slot = wrapper.wrap(dek, CONTEXT)
        text = json.dumps(slot.to_json()) + repr(slot) + str(slot)
        for form in (
            raw.hex(),
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode(),
        ):
            assert form not in text
        assert raw not in slot.blob

    @pytest.mark.parametrize(
        "context",
        [{}, {**CONTEXT, "tenant": "t2"}, {**CONTEXT, "extra": "x"}],
        ids=["empty", "other-tenant", "extra-key"],
    )
    def test_context_is_bound(self, wrapper: Wrapper, unwrapper: Unwrapper, context: dict) -> None:
        slot = wrapper.wrap(DataKey.generate(), CONTEXT)
        with pytest.raises(self.altered):
            unwrapper.unwrap(slot, context)

    def test_other_key_cannot_unwrap(self, wrapper: Wrapper, other_unwrapper: Unwrapper) -> None:
        slot = wrapper.wrap(DataKey.generate(), CONTEXT)
        with pytest.raises(KeyUnavailable) as info:
            other_unwrapper.unwrap(slot, CONTEXT)
        assert str(info.value)

    def test_corrupt_blob_is_refused(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        slot = wrapper.wrap(DataKey.generate(), CONTEXT)
        for blob in (slot.blob[:-1], bytes([slot.blob[0] ^ 1]) + slot.blob[1:], b""):
            bad = KeySlot(slot.kind, slot.key_id, blob, slot.params)
            with pytest.raises(self.altered):
                unwrapper.unwrap(bad, CONTEXT)

    def test_changed_header_context(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        # The header's context edited after sealing: never a key, never plaintext;
        # tampering (exit 1) where the provider can tell, else "no key".
        out = io.BytesIO()
        seal_stream(io.BytesIO(b"x" * 100), out, [wrapper], context=CONTEXT)
        hb = parse_preamble(out.getvalue()).header_bytes
        edited = hb.replace(b'"tenant":"t1"', b'"tenant":"t2"')
        assert edited != hb
        with pytest.raises(self.altered):
            open_sealed(out.getvalue().replace(hb, edited), [unwrapper]).close()

    def test_concurrent_unwraps(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        deks = [DataKey.generate() for _ in range(32)]
        slots = [wrapper.wrap(d, CONTEXT) for d in deks]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda s: unwrapper.unwrap(s, CONTEXT).material(), slots))
        assert got == [d.material() for d in deks]

    def test_sealed_file_end_to_end(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        data = bytes(range(256)) * 1000
        out = io.BytesIO()
        seal_stream(io.BytesIO(data), out, [wrapper], context=CONTEXT, chunk_size=65536)
        with open_sealed(out.getvalue(), [unwrapper]) as f:
            assert f.read_range(0, len(data)) == data

    def test_swapped_slot_is_authentication_error(
        self, wrapper: Wrapper, unwrapper: Unwrapper
    ) -> None:
        a, b = io.BytesIO(), io.BytesIO()
        seal_stream(io.BytesIO(b"a" * 10), a, [wrapper], context=CONTEXT)
        seal_stream(io.BytesIO(b"b" * 10), b, [wrapper], context=CONTEXT)
        pa, pb = parse_preamble(a.getvalue()), parse_preamble(b.getvalue())
        with pytest.raises(AuthenticationError):
            unwrap_dek(pa, [unwrapper], slots=pb.slots).close()

    def test_unwrap_first_lists_each_cause(
        self, wrapper: Wrapper, other_unwrapper: Unwrapper
    ) -> None:
        slots = [wrapper.wrap(DataKey.generate(), CONTEXT) for _ in range(2)]
        with pytest.raises(KeyUnavailable) as info:
            unwrap_first(slots, lambda s: [other_unwrapper], CONTEXT, lambda d: None)
        assert len(info.value.causes) == 2
        assert all(kid == wrapper.key_id for kid, _ in info.value.causes)

    def test_rotation_in_place(self, wrapper: Wrapper, unwrapper: Unwrapper) -> None:
        # `keys rotate --to` the key a slot already uses: the slot is re-wrapped
        # (rewrap where the provider has it), and the file still opens.
        data = b"rotate me" * 1000
        out = io.BytesIO()
        seal_stream(io.BytesIO(data), out, [wrapper], context=CONTEXT, chunk_size=65536)
        preamble = parse_preamble(out.getvalue())
        (slot,) = rotate_slots(preamble, [wrapper.key_id], identities=[unwrapper])
        assert slot.key_id == wrapper.key_id
        rotated = preamble.with_slots([slot]) + out.getvalue()[preamble.payload_offset :]
        with open_sealed(rotated, [unwrapper]) as f:
            assert f.read_range(0, len(data)) == data
