"""Configuration: valid files build GroupPolicy per level; every mistake is ONE line naming
the file, the key and what is allowed, with exit code 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from groupsec.controller.config import EXAMPLE, parse_config
from groupsec.errors import ConfigError

BASE = 'dst = "239.1.1.1"\nrekey_channel = "239.1.1.255:7500"\n'


def _cfg(extra: str, base: str = BASE):
    return parse_config(tomllib.loads(f"[groups.video]\n{base}{extra}"), "groupsec.toml")


def test_example_config_is_valid():
    cfg = parse_config(tomllib.loads(EXAMPLE))
    lc = cfg.levels[("video", "")]
    assert lc.policy.suite == "aes-gcm-16-128"
    assert lc.policy.rekey_addr == "239.1.1.255"
    assert lc.policy.rekey_port == 7500
    assert lc.policy.port == 5004
    assert lc.sender_id_bits == 8


def test_levels_inherit_and_override():
    cfg = _cfg('port = 5000\n[groups.video.levels.hd]\nsuite = "aes-gcm-16-256"\nmembers = ["a"]\n'
               '[groups.video.levels.sd]\nport = 5002\n')
    hd, sd = cfg.levels[("video", "hd")], cfg.levels[("video", "sd")]
    assert (hd.policy.suite, hd.policy.port, hd.members) == ("aes-gcm-16-256", 5000, frozenset({"a"}))
    assert (sd.policy.suite, sd.policy.port, sd.members) == ("aes-gcm-16-128", 5002, None)
    assert hd.policy.level == "hd"


def test_ipv6_ssm_ah_and_per_sender():
    cfg = parse_config(tomllib.loads(
        '[groups.g]\ndst = "ff3e::1"\nsource = "2001:db8::1"\nprotection = "ah"\nsuite = "hmac-sha-256-128"\n'
        'sender_policy = "per-sender"\nrekey_channel = "[ff3e::2]:7000"\nmode = "transport"\nprotocol = "any"\n'))
    p = cfg.levels[("g", "")].policy
    assert (p.dst, p.src, p.protocol, p.mode, p.ip_proto, p.udp_encap_port) == (
        "ff3e::1", "2001:db8::1", "ah", "transport", None, None)


@pytest.mark.parametrize(("extra", "message"), [
    ('suite = "aes-ctr"\n', "groupsec.toml: groups.video.suite: 'aes-ctr' is not one of aes-gcm-16-128, "),
    ('protection = "gre"\n', "groups.video.protection: 'gre' is not one of esp, ah"),
    ('mode = "bridge"\n', "groups.video.mode: 'bridge' is not one of transport, tunnel"),
    ('replay_window = 0\n', "groups.video.replay_window: 0 is not in 32..4096"),
    ('port = 70000\n', "groups.video.port: 70000 is not in 1..65535"),
    ('atd = "soon"\n', "groups.video.atd: 'soon' is not an integer or a number"),
    ('tek_lifetime = 2\n', "groups.video.tek_lifetime: 2.0 must exceed atd + dtd (3.0)"),
    ('sender_policy = "anyone"\n', "groups.video.sender_policy: 'anyone' is not one of shared, per-sender"),
    ('datapath = "xfrm"\n', "groups.video.sender_policy: 'shared' with counter-mode suite aes-gcm-16-128 is refused"
                            " for datapath xfrm"),
    ('sender_id_bits = 0\n', "groups.video.sender_id_bits: a shared counter-mode SA needs sender IDs"),
    ('colour = "red"\n', "groups.video.colour: unknown key"),
    ('source = "10.0.0.1"\n[groups.video.levels.hd]\nsource = "::1"\n',
     "groups.video.levels.hd.source: must be of the same IP version as dst"),
])
def test_one_line_errors(extra, message):
    with pytest.raises(ConfigError) as ei:
        _cfg(extra)
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_and_unicast_dst():
    with pytest.raises(ConfigError, match=r"groups.video.dst: missing"):
        _cfg("", base='rekey_channel = "239.1.1.255:7500"\n')
    with pytest.raises(ConfigError, match=r"groups.video.dst: '10.0.0.1' is not a multicast address"):
        _cfg("", base='dst = "10.0.0.1"\nrekey_channel = "239.1.1.255:7500"\n')
    with pytest.raises(ConfigError, match=r"groups.video.rekey_channel: '239.1.1.1' is not ADDRESS:PORT"):
        _cfg("", base='dst = "239.1.1.1"\nrekey_channel = "239.1.1.1"\n')


def test_cli_prints_one_line_and_exits_2(tmp_path):
    home = tmp_path / "h"
    r = subprocess.run([sys.executable, "-m", "groupsec.cli", "init", str(home)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = home / "groupsec.toml"
    cfg.write_text(cfg.read_text().replace('suite = "aes-gcm-16-128"', 'suite = "aes-ctr"'))
    r = subprocess.run([sys.executable, "-m", "groupsec.cli", "serve", "-d", str(home)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "groupsec.toml: groups.video.suite: 'aes-ctr' is not one of aes-gcm-16-128" in r.stderr
    assert "Traceback" not in r.stderr
    # the secret files are 0600
    for f in ("ca.key", "controller.key", "rekey.key", "state.db", "groupsec.toml"):
        assert (home / f).stat().st_mode & 0o777 == 0o600, f
