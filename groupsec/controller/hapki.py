"""Certificates for several controllers (HA): each controller its own TLS certificate and its
own Ed25519 rekey key, certified by the group CA (``groupsec.protocol.rekeycert``).

    groupsec controller add ctl-b --out /etc/groupsec/ctl-b -d CA_HOME --host 10.0.0.2

makes a controller home without the CA's private key: ca.crt, groupsec.toml (copied),
controller.key/.crt (CN = the name), rekey.key, rekey.crt, and the shared store key
(store.key, created in CA_HOME on first use: every controller of one cluster needs the same).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from groupsec.controller import pki
from groupsec.controller.home import CONFIG, add_home_argument, home_of
from groupsec.controller.sealing import generate_store_key
from groupsec.errors import ConfigError
from groupsec.protocol.rekeycert import REKEY_SIGNING

REKEY_CERT = "rekey.crt"
STORE_KEY = "store.key"


def issue_rekey_cert(ca: pki.CA, name: str, key: Ed25519PrivateKey, days: int = 825) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "groupsec"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([REKEY_SIGNING]), critical=False)
            .sign(ca.key, hashes.SHA256()))


def ensure_rekey_cert(home: Path, ca: pki.CA, name: str) -> bytes:
    """DER of HOME/rekey.crt, issued for HOME/rekey.key when missing (single-controller homes)."""
    p = home / REKEY_CERT
    if not p.exists():
        pki.write_public(p, pki.cert_pem(issue_rekey_cert(ca, name, pki.load_rekey_key(home))))
    return load_rekey_cert_der(home)


def load_rekey_cert_der(home: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate((home / REKEY_CERT).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{home / REKEY_CERT}: missing (make controller homes with `groupsec controller add`)"
                          ) from None
    return cert.public_bytes(Encoding.DER)


def add_controller(ca_home: Path, out: Path, name: str, hosts: list[str]) -> Path:
    ca = pki.CA.load(ca_home)
    if (out / pki.CTL_KEY).exists():
        raise ConfigError(f"{out}: already holds a controller key")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    pki.write_public(out / pki.CA_CERT, pki.cert_pem(ca.cert))
    if not (out / CONFIG).exists() and (ca_home / CONFIG).exists():
        shutil.copyfile(ca_home / CONFIG, out / CONFIG)
        os.chmod(out / CONFIG, 0o600)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", name, *hosts]))
    pki.write_secret(out / pki.CTL_KEY, pki.key_pem(tls_key))
    pki.write_public(out / pki.CTL_CERT, pki.cert_pem(ca.issue(name, tls_key.public_key(), server=True,
                                                               hosts=names, days=825)))
    rk = Ed25519PrivateKey.generate()
    pki.write_secret(out / pki.REKEY_KEY, pki.key_pem(rk))
    pki.write_public(out / REKEY_CERT, pki.cert_pem(issue_rekey_cert(ca, name, rk)))
    if not (ca_home / STORE_KEY).exists():
        generate_store_key(ca_home / STORE_KEY)
    if out.resolve() != ca_home.resolve():
        pki.write_secret(out / STORE_KEY, (ca_home / STORE_KEY).read_bytes())
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("controller", help="HA: make another controller's home (its own TLS and rekey keys)")
    csub = p.add_subparsers(dest="controller_cmd", metavar="ACTION")
    csub.required = True
    a = csub.add_parser("add", help="issue a controller home from the CA home (-d)")
    a.add_argument("name")
    a.add_argument("--out", required=True, metavar="DIR")
    a.add_argument("--host", action="append", default=[], metavar="NAME", help="DNS name or IP (repeatable)")
    add_home_argument(a)
    a.set_defaults(func=_cmd_add)


def _cmd_add(args: argparse.Namespace) -> int:
    out = add_controller(home_of(args), Path(args.out), args.name, args.host)
    print(f"controller {args.name}: {out} (TLS cert, rekey key certified by the CA, shared store key)")
    return 0
