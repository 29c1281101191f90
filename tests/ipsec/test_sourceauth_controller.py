"""The controller refuses source_auth where it cannot work: XFRM (no signature transform in the
kernel) at the group, member-registry and registration levels, and AH (not implemented)."""

from __future__ import annotations

import tomllib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from groupsec.controller.config import parse_config
from groupsec.controller.groups import GroupManager, Refusal
from groupsec.controller.store import MemoryStore
from groupsec.errors import ConfigError, RemoteProtocolError, SourceAuthFailed
from groupsec.ipsec.policy import GroupPolicy
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.sourceauth import public_key_bytes
from groupsec.ipsec.sourceauth_group import GroupSourceAuth
from groupsec.protocol.messages import Grant, GroupRequest, Registered, decode_message_untrusted

GROUP = '[groups.cams]\ndst = "239.7.7.7"\nrekey_channel = "239.7.7.255:7500"\nsender_policy = "per-sender"\n'


def cfg(extra: str = "", sender_policy: str = "per-sender"):
    group = GROUP.replace('"per-sender"', f'"{sender_policy}"')
    return parse_config(tomllib.loads(group + extra), "groupsec.toml")


@pytest.mark.parametrize("mode", ["sign", "sign-batched"])
def test_config_refuses_source_auth_on_xfrm_and_ah(mode: str) -> None:
    assert cfg(f'source_auth = "{mode}"\n').levels[("cams", "")].policy.source_auth == mode
    with pytest.raises(ConfigError, match=r"groups.cams.source_auth: .*kernel \(xfrm\) has no signature transform"):
        cfg(f'source_auth = "{mode}"\ndatapath = "xfrm"\n')
    with pytest.raises(ConfigError, match=r"groups.cams.source_auth: .*protection = \"esp\" only"):
        cfg(f'source_auth = "{mode}"\nprotection = "ah"\nsuite = "hmac-sha-256-128"\n')
    cfg('datapath = "xfrm"\n')  # without source_auth, xfrm stays fine


def test_xfrm_members_are_refused_for_source_auth_groups() -> None:
    store = MemoryStore()
    gm = GroupManager(cfg('source_auth = "sign-batched"\n'), store)
    with pytest.raises(ConfigError, match=r"--group cams:receiver: source_auth 'sign-batched' needs the userspace"):
        gm.check_member_groups([("cams", "receiver", "")], xfrm=True)
    gm.check_member_groups([("cams", "receiver", "")], xfrm=False)
    store.commit({f"member/{name}": {"name": name, "groups": [["cams", "receiver", ""]], "datapath": dp}
                  for name, dp in (("k1", "xfrm"), ("u1", "any"))})
    refused = gm.authorize("k1", None, [GroupRequest("cams", "receiver")])
    assert isinstance(refused, Refusal)
    assert refused.code == "not-authorized"
    assert "no signature transform" in refused.message
    assert gm.authorize("u1", None, [GroupRequest("cams", "receiver")]) == {("cams", ""): {"receiver"}}


def test_grant_carries_sender_keys_through_the_strict_decoder() -> None:
    """Registered is decoded with strict_map_key (string keys only): sender_keys travel as pairs."""
    keys = {7: public_key_bytes(Ed25519PrivateKey.generate()), 300: public_key_bytes(Ed25519PrivateKey.generate())}
    g = Grant(GroupPolicy("cams", "239.7.7.7", source_auth="sign"), "receiver", (), 1, bytes(32), 1,
              sender_keys=keys)
    msg = decode_message_untrusted(Registered("m", [g.to_wire()], bytes(32), 0.0, 30.0).encode())
    assert isinstance(msg, Registered)
    assert msg.grant_objects()[0].sender_keys == keys
    bad = g.to_wire() | {"sender_keys": [[7, b"short"]]}
    with pytest.raises(RemoteProtocolError, match="sender_keys must be a list"):
        Grant.from_wire_untrusted(bad)


@pytest.mark.parametrize("policy", ["shared", "per-sender"])
def test_controller_keys_senders_and_revokes_them(policy: str) -> None:
    """The controller gives each sender a signing key (only in its own grant), tells receivers the
    public keys (grant and rekey), and an eviction revokes the key: end to end through the SAs."""
    config = cfg('source_auth = "sign-batched"\n', policy)
    lc = config.levels[("cams", "")]
    assert lc.policy.sender_policy == policy
    gm = GroupManager(config, MemoryStore())
    gm.load_or_create(100.0)
    plan = gm.ensure_sender("cam1", lc, 100.0)
    assert plan is not None
    tx_grant = gm.grant("cam1", lc, {"sender"})
    sid = tx_grant.sender_id
    rx_grant = gm.grant("tv", lc, {"receiver"})
    sk = Ed25519PrivateKey.from_private_bytes(tx_grant.extra["signing_key"])
    assert tx_grant.sender_keys == {}  # a sender-only member needs no public keys
    assert "signing_key" not in rx_grant.extra  # a receiver never gets a private key
    assert rx_grant.sender_keys == plan.inner["sender_keys"] == {sid: public_key_bytes(sk)}
    # the keys work with the SAs the grants carry
    out_p = next(s.params for s in tx_grant.sas if s.direction == "out")
    in_p = next(s.params for s in rx_grant.sas if s.direction == "in" and s.params.spi == out_p.spi)
    owners = {spi: owner for spi, owner in rx_grant.extra.get("owners", [])}
    tx = GroupSourceAuth("sign-batched", signing_key=tx_grant.extra["signing_key"])
    rx = GroupSourceAuth("sign-batched", sender_keys=rx_grant.sender_keys, owners=owners)
    out_sa, in_sa = SecurityAssociation(out_p, "out", 0.0), SecurityAssociation(in_p, "in", 0.0)
    pkts = tx.seal(out_sa, 4, b"frame", 0.0) + tx.flush()
    assert rx.opener(in_sa).open_esp_untrusted(pkts[0], 0.0)[1] == b"frame"
    # eviction: the next rollover lists the sender as revoked and no longer carries its key
    (_, roll), = gm.evict("cam1", 200.0)
    assert sid in roll.inner["revoked_senders"]
    assert sid not in roll.inner["sender_keys"]
    rx.update(roll.inner["sender_keys"], owners)
    with pytest.raises(SourceAuthFailed):
        rx.opener(in_sa).open_esp_untrusted((tx.seal(out_sa, 4, b"after", 0.0) + tx.flush())[0], 0.0)
