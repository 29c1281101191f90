"""The controller's small PKI: a CA (ECDSA P-256), the controller's TLS certificate,
member certificates (issued here, or from a member's CSR), and the rekey-signing key.

Files in the controller home DIR (secrets 0600):
    ca.key ca.crt  controller.key controller.crt  rekey.key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from groupsec.errors import ConfigError

CA_KEY, CA_CERT = "ca.key", "ca.crt"
CTL_KEY, CTL_CERT = "controller.key", "controller.crt"
REKEY_KEY = "rekey.key"


def write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "groupsec"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str = "groupsec CA", days: int = 3650) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, home: Path) -> CA:
        try:
            key = serialization.load_pem_private_key((home / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((home / CA_CERT).read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"{exc.filename}: missing (run `groupsec init {home}` first)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{home / CA_KEY}: not an EC private key")
        return cls(key, cert)

    def issue(self, cn: str, public_key: ec.EllipticCurvePublicKey | object, *, server: bool = False,
              hosts: list[str] | None = None, days: int = 365,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> x509.Certificate:
        now = _now()
        nb = not_before or now - dt.timedelta(minutes=5)
        na = not_after or now + dt.timedelta(days=days)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
             .not_valid_before(nb).not_valid_after(na)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def sign_csr(self, csr_pem: bytes, cn: str, days: int = 365) -> x509.Certificate:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            try:
                csr = x509.load_der_x509_csr(csr_pem)
            except ValueError:
                raise ConfigError("the CSR is not a PEM or DER certificate signing request") from None
        if not csr.is_signature_valid:
            raise ConfigError("the CSR's self-signature does not verify")
        pk = csr.public_key()
        if not isinstance(pk, ec.EllipticCurvePublicKey) or pk.curve.name not in ("secp256r1", "secp384r1"):
            raise ConfigError("the CSR key must be ECDSA P-256 or P-384")
        return self.issue(cn, pk, days=days)


def new_member_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def init_pki(home: Path, hosts: list[str]) -> CA:
    ca = CA.create()
    write_secret(home / CA_KEY, key_pem(ca.key))
    write_public(home / CA_CERT, cert_pem(ca.cert))
    ctl_key = ec.generate_private_key(ec.SECP256R1())
    names = ["localhost", "127.0.0.1", "::1", *hosts]
    cert = ca.issue("groupsec-controller", ctl_key.public_key(), server=True, hosts=list(dict.fromkeys(names)),
                    days=825)
    write_secret(home / CTL_KEY, key_pem(ctl_key))
    write_public(home / CTL_CERT, cert_pem(cert))
    write_secret(home / REKEY_KEY, key_pem(Ed25519PrivateKey.generate()))
    return ca


def load_rekey_key(home: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key((home / REKEY_KEY).read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"{home / REKEY_KEY}: missing (run `groupsec init {home}` first)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{home / REKEY_KEY}: not an Ed25519 private key")
    return key


def cert_serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "X")
