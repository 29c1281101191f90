"""The member CLI: add (directory and single-file bundles), sign (CSR), set, list, revoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from groupsec.controller.store import SQLiteStore


def _g(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "groupsec.cli", *args, "-d", str(home)], capture_output=True,
                          text=True, timeout=60)


def test_member_lifecycle(home: Path, tmp_path: Path):
    r = _g(home, "member", "add", "alice", "--group", "video:sender", "--group", "video:receiver",
           "--out", str(tmp_path / "alice"))
    assert r.returncode == 0, r.stderr
    b = tmp_path / "alice"
    assert (b / "member.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((b / "member.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    ca = x509.load_pem_x509_certificate((b / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["controller"] == "127.0.0.1:0"
    assert meta["ca_sha256"] == ca.fingerprint(hashes.SHA256()).hex()

    r = _g(home, "member", "add", "bob", "--group", "tv:receiver:sd", "--out", str(tmp_path / "bob.pem"))
    assert r.returncode == 0, r.stderr
    pem = (tmp_path / "bob.pem").read_text()
    assert pem.startswith("# groupsec member bundle\n# name: bob\n")
    assert pem.count("BEGIN CERTIFICATE") == 2
    assert "BEGIN PRIVATE KEY" in pem

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])).sign(key, hashes.SHA256()))
    (tmp_path / "dev.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    r = _g(home, "member", "sign", str(tmp_path / "dev.csr"), "--name", "dev1", "--group", "plant:receiver",
           "--out", str(tmp_path / "dev1.crt"))
    assert r.returncode == 0, r.stderr
    dev = x509.load_pem_x509_certificate((tmp_path / "dev1.crt").read_bytes())
    assert dev.public_key() == key.public_key()  # the device's own key: it never left the device
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1"  # the name is ours

    # refusals: unknown group, unknown level, XFRM sender on a shared counter-mode group, duplicate name
    for args, msg in ((["nope:receiver"], "--group nope: unknown group"),
                      (["tv:receiver:uhd"], "unknown level (levels of tv: hd, sd)"),
                      (["video:sender", "--xfrm"], "cannot use the shared counter-mode SA")):
        r = _g(home, "member", "add", "x", "--group", *args, "--out", str(tmp_path / "x"))
        assert r.returncode == 2
        assert msg in r.stderr
        assert "Traceback" not in r.stderr
    r = _g(home, "member", "add", "alice", "--group", "video:receiver", "--out", str(tmp_path / "a2"))
    assert r.returncode == 2
    assert "exists" in r.stderr
    r = _g(home, "member", "add", "x", "--group", "plant:sender", "--xfrm", "--out", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr  # per-sender SAs: fine for XFRM

    r = _g(home, "member", "set", "bob", "--group", "tv:receiver")
    assert r.returncode == 0, r.stderr
    r = _g(home, "member", "revoke", "alice")
    assert r.returncode == 0, r.stderr
    assert "no controller is running" in r.stdout
    r = _g(home, "member", "list", "--json")
    members = {m["name"]: m for m in json.loads(r.stdout)}
    assert sorted(members) == ["alice", "bob", "dev1", "x"]
    assert members["alice"]["revoked"] is True
    assert members["bob"]["groups"] == [["tv", "receiver", ""]]
    assert members["x"]["datapath"] == "xfrm"
    s = SQLiteStore(home / "state.db")
    try:
        assert s.get(f"revoked/{cert.serial_number:X}") == {"name": "alice"}
    finally:
        s.close()
    r = _g(home, "member", "add", "alice", "--group", "video:receiver", "--out", str(tmp_path / "a3"))
    assert "revoked" in r.stderr
    r = _g(home, "rekey", "video")
    assert r.returncode == 2
    assert "no controller is running" in r.stderr
