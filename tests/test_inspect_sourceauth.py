"""groupsec inspect --sender-keys: the file format and its one-line errors."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.errors import ConfigError
from groupsec.inspect import SenderKeys, format_sender_keys, parse_sender_keys_untrusted
from groupsec.ipsec.sourceauth import public_key_bytes

PUB = public_key_bytes(Ed25519PrivateKey.generate())


def test_round_trip() -> None:
    g = SenderKeys("FF0E::0002:11", "sign-batched", {7: PUB}, {0x1A2B3C4D: 7})
    (back,) = parse_sender_keys_untrusted(format_sender_keys([g]))
    assert back == SenderKeys("ff0e::2:11", "sign-batched", {7: PUB}, {0x1A2B3C4D: 7})


@pytest.mark.parametrize(("doc", "where"), [
    ("not json", "file: not JSON"),
    ({"groups": []}, "file: needs"),
    ({"source_auth": [{"dst": "239.1.1.1"}]}, r"source_auth\[0\]: needs"),
    ({"source_auth": [{"dst": "239.1.1.1", "mode": "rsa", "sender_keys": {}}]}, r"source_auth\[0\].mode: 'rsa'"),
    ({"source_auth": [{"dst": "239.1.1.1", "sender_keys": {"7": "00" * 31}}]}, r"source_auth\[0\]: bad"),
    ({"source_auth": [{"dst": "nowhere", "sender_keys": {}}]}, r"source_auth\[0\]: bad"),
    ({"source_auth": [{"dst": "239.1.1.1", "sender_keys": {"x": PUB.hex()}}]}, r"source_auth\[0\]: bad"),
])
def test_mistakes_are_one_config_error(doc: object, where: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(ConfigError, match=rf"^senders.json: {where}"):
        parse_sender_keys_untrusted(text, "senders.json")
