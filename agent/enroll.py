"""``groupsec-agent enroll --name NAME --out DIR``: make this device's key and a CSR.

The private key never leaves the device: send ``DIR/member.csr`` to the operator, who runs
``groupsec member sign CSR ...`` and returns the certificate (and the CA certificate); put
them next to the key as ``DIR/member.crt`` and ``DIR/ca.crt`` and DIR is a credential bundle.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from groupsec.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def register(sub: Any) -> None:
    p = sub.add_parser("enroll", help="make a private key and a CSR for `groupsec member sign`",
                       description="Create DIR/member.key (mode 0600) and DIR/member.csr for the member NAME.")
    p.add_argument("--name", required=True, help="the member name (the certificate's CN)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for member.key and member.csr")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(func=main)


def enroll(name: str, out: Path, force: bool = False) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: {exc.strerror}") from None
    key_path, csr_path = out / "member.key", out / "member.csr"
    if key_path.exists() and not force:
        raise ConfigError(f"{key_path}: already exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "groupsec"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def main(args: argparse.Namespace) -> int:
    key_path, csr_path = enroll(args.name, Path(args.out), args.force)
    print(f"wrote {key_path} (0600, keep it here) and {csr_path}")
    print(f"next: groupsec member sign {csr_path} --name {args.name} ... ; save the certificate as "
          f"{Path(args.out) / 'member.crt'} and the CA as {Path(args.out) / 'ca.crt'}")
    return 0
