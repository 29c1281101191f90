"""Agent configuration and credential bundles: every mistake is one line naming the file, the
key and what is allowed, and the command exits 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import (
    AgentConfig,
    from_dict,
    load,
    load_bundle,
    parse_group_flag,
    parse_hostport,
    parse_relay_flag,
)
from agent.enroll import enroll
from groupsec.controller import pki
from groupsec.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca() -> pki.CA:
    return pki.CA.create()


def make_bundle(tmp: Path, ca: pki.CA, name: str = "alice", hint: str | None = "ctl.example:7443",
                one_file: bool = False, **issue_kw) -> Path:
    key = pki.new_member_key()
    cert = ca.issue(name, key.public_key(), **issue_kw)
    if one_file:
        out = tmp / f"{name}.pem"
        header = f"# groupsec member bundle\n# controller: {hint}\n" if hint else ""
        pki.write_secret(out, header.encode() + pki.key_pem(key) + pki.cert_pem(cert) + pki.cert_pem(ca.cert))
        return out
    out = tmp / f"{name}.bundle"
    out.mkdir()
    pki.write_secret(out / "member.key", pki.key_pem(key))
    (out / "member.crt").write_bytes(pki.cert_pem(cert))
    (out / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    if hint:
        (out / "controller").write_text(hint + "\n")
    return out


def base(**kw) -> dict:
    d = {"bundle": "/b", "group": [{"name": "video", "role": "sender"}]}
    d.update(kw)
    return d


# --- the TOML document -----------------------------------------------------------------------


def test_full_config_parses(tmp_path):
    cfg = from_dict({
        "bundle": "b", "controller": "10.0.0.1:7443", "datapath": "userspace", "interface": "eth0",
        "state_dir": "st", "ttl": 4, "wire": "encap",
        "group": [{"name": "video", "role": "sender", "relay_listen": "127.0.0.1:6000"},
                  {"name": "video", "role": "receiver", "level": "hd", "relay_deliver": 6001, "relay_group_port": 5004}],
        "tun": {"name": "gs0", "mtu": 1300, "groups": ["video"]},
        "session": {"ack_jitter": 0.5, "reconnect_max": 60}, "testing": {"drop_multicast_rekey": 0.3},
    }, "agent.toml", tmp_path)
    assert isinstance(cfg, AgentConfig)
    assert cfg.controller == ("10.0.0.1", 7443)
    assert cfg.bundle == tmp_path / "b"
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.groups[1].relay_deliver == ("127.0.0.1", 6001)
    assert cfg.groups[1].name == "video/hd"
    assert cfg.tun is not None
    assert cfg.tun.groups == ("video",)
    assert cfg.reconnect_max == 60.0
    assert cfg.testing.drop_multicast_rekey == 0.3


def test_controller_defaults_to_the_bundle_hint_and_discover_is_explicit():
    assert from_dict(base()).controller is None
    assert from_dict(base()).discover is False
    d = from_dict(base(controller="discover"))
    assert (d.controller, d.discover) == (None, True)
    assert from_dict(base(controller="gcks")).controller == ("gcks", 7443)
    assert from_dict(base(controller="[::1]:99")).controller == ("::1", 99)


@pytest.mark.parametrize(("doc", "message"), [
    ({"group": [{"name": "v", "role": "sender"}]}, "agent.toml: bundle: missing"),
    (base(datapath="kernel"), "agent.toml: datapath: 'kernel' is not one of userspace, xfrm"),
    (base(group=[{"name": "v", "role": "admin"}]), "agent.toml: group[0].role: 'admin' is not one of sender, receiver"),
    (base(group=[]), "agent.toml: group: no group to join"),
    (base(group=[{"name": "v", "role": "sender"}, {"name": "v", "role": "receiver"}]), "'v' is listed twice"),
    (base(group=[{"name": "v", "role": "sender", "colour": 1}]), "agent.toml: group[0].colour: unknown key"),
    (base(group=[{"name": "v", "role": "sender", "relay_listen": "x:99999"}]), "group[0].relay_listen:"),
    (base(ttl=0), "agent.toml: ttl: 0 is outside 1..255"),
    (base(ttl="1"), "agent.toml: ttl: '1' must be a int"),
    (base(wire="udp"), "agent.toml: wire: 'udp' is not one of auto, encap, raw"),
    (base(controller="a:b:c:"), "agent.toml: controller:"),
    (base(session={"ack_jitter": -1}), "agent.toml: session.ack_jitter: -1.0 must be above 0"),
    (base(session={"reconnect_min": 10, "reconnect_max": 1}), "session.reconnect_min: must not be above"),
    (base(session={"retries": 3}), "agent.toml: session.retries: unknown key"),
    (base(testing={"drop_multicast_rekey": 1.0}), "testing.drop_multicast_rekey: 1.0 is outside"),
    (base(tun={"mtu": 100}), "agent.toml: tun.mtu: 100 is outside 576..9000"),
    (base(tun={"name": "a-very-long-device-name"}), "agent.toml: tun.name:"),
    (base(log_level="loud"), "agent.toml: log_level: 'loud' is not one of"),
    (base(bogus=1), "agent.toml: bogus: unknown key (allowed:"),
])
def test_each_mistake_is_one_line_naming_the_key(doc, message):
    with pytest.raises(ConfigError) as ei:
        from_dict(doc, "agent.toml")
    text = str(ei.value)
    assert message in text
    assert "\n" not in text


def test_flags_parse_and_refuse_nonsense():
    assert parse_group_flag("video:receiver:hd").level == "hd"
    with pytest.raises(ConfigError, match="role 'boss' is not one of sender, receiver"):
        parse_group_flag("video:boss")
    assert parse_relay_flag("video=6000,-") == ("video", ("127.0.0.1", 6000), None, None)
    assert parse_relay_flag("video=-,10.0.0.2:6001,5004") == ("video", None, ("10.0.0.2", 6001), 5004)
    with pytest.raises(ConfigError, match="expected GROUP=LISTEN,DELIVER"):
        parse_relay_flag("video:6000")
    with pytest.raises(ValueError, match="port must be"):
        parse_hostport("h:70000")


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text("bundle = \n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load(tmp_path / "missing.toml")


# --- credential bundles -------------------------------------------------------------------------


def test_directory_and_one_file_bundles_load(tmp_path, ca):
    b = load_bundle(make_bundle(tmp_path, ca))
    assert b.name == "alice"
    assert b.controller_hint == ("ctl.example", 7443)
    assert b.ca_fingerprint == pki.fingerprint(ca.cert)
    one = load_bundle(make_bundle(tmp_path, ca, "bob", hint="10.1.2.3:7000", one_file=True))
    assert (one.name, one.controller_hint) == ("bob", ("10.1.2.3", 7000))


def test_bundle_from_groupsec_member_add_loads(tmp_path):
    run = [sys.executable, "-m", "groupsec.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([*run, "init", str(tmp_path / "ctl")], check=True, env=env, capture_output=True)
    for out in ("m.bundle", "m2.pem"):
        name = out.split(".")[0]
        subprocess.run([*run, "member", "add", name, "--group", "video:receiver", "-d", str(tmp_path / "ctl"),
                        "--out", str(tmp_path / out)], check=True, env=env, capture_output=True)
        b = load_bundle(tmp_path / out)
        assert b.name == name
        assert b.controller_hint is not None


@pytest.mark.parametrize(("breakage", "message"), [
    ("no-key", "the bundle has no private key"),
    ("no-ca", "the bundle has no CA certificate"),
    ("garbage-key", "not a usable unencrypted PEM private key"),
    ("other-key", "the certificate does not match the private key"),
    ("other-ca", "not issued by the bundle's CA"),
    ("expired", "the certificate expired on"),
    ("missing", "credential bundle not found"),
])
def test_bad_bundles_are_one_line_errors(tmp_path, ca, breakage, message):
    import datetime as dt

    kw = {}
    if breakage == "expired":
        now = dt.datetime.now(dt.UTC)
        kw = {"not_before": now - dt.timedelta(days=10), "not_after": now - dt.timedelta(days=1)}
    p = make_bundle(tmp_path, ca, **kw)
    if breakage == "no-key":
        (p / "member.key").unlink()
    elif breakage == "no-ca":
        (p / "ca.crt").unlink()
    elif breakage == "garbage-key":
        (p / "member.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif breakage == "other-key":
        (p / "member.key").write_bytes(pki.key_pem(pki.new_member_key()))
    elif breakage == "other-ca":
        (p / "ca.crt").write_bytes(pki.cert_pem(pki.CA.create("another CA").cert))
    elif breakage == "missing":
        p = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as ei:
        load_bundle(p)
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_run_with_a_bad_bundle_exits_2_with_one_line(tmp_path, ca):
    p = make_bundle(tmp_path, ca)
    (p / "member.key").write_bytes(pki.key_pem(pki.new_member_key()))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--bundle", str(p), "--group", "video:sender",
                        "--controller", "127.0.0.1:1", "--state-dir", str(tmp_path / "st")],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "member.crt: the certificate does not match the private key" in lines[0]
    assert "Traceback" not in r.stderr


def test_run_with_a_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('bundle = "b"\ndatapath = "kernel"\n[[group]]\nname = "v"\nrole = "sender"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"groupsec-agent run: error: {cfg}: datapath: 'kernel' is not one of userspace, xfrm")


# --- enrol ----------------------------------------------------------------------------------------


def test_enroll_makes_a_0600_key_and_a_csr_the_controller_signs(tmp_path, ca):
    key_path, csr_path = enroll("device-7", tmp_path / "dev")
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    cert = ca.sign_csr(csr_path.read_bytes(), "device-7")
    (tmp_path / "dev" / "member.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "dev" / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    assert load_bundle(tmp_path / "dev").name == "device-7"  # the key never left the directory
    with pytest.raises(ConfigError, match="already exists"):
        enroll("device-7", tmp_path / "dev")
    with pytest.raises(ConfigError, match="--name"):
        enroll("bad name!", tmp_path / "x")
