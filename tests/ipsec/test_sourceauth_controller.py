"""The controller refuses source_auth where it cannot work: XFRM (no signature transform in the
kernel) at the group, member-registry and registration levels, and AH (not implemented)."""

from __future__ import annotations

import tomllib

import pytest

from groupsec.controller.config import parse_config
from groupsec.controller.groups import GroupManager, Refusal
from groupsec.controller.store import MemoryStore
from groupsec.errors import ConfigError
from groupsec.protocol.messages import GroupRequest

GROUP = '[groups.cams]\ndst = "239.7.7.7"\nrekey_channel = "239.7.7.255:7500"\nsender_policy = "per-sender"\n'


def cfg(extra: str = ""):
    return parse_config(tomllib.loads(GROUP + extra), "groupsec.toml")


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
