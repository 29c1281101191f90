"""Rekey-signing certificates: the CA's binding of a controller's Ed25519 rekey key.

With several controllers (HA), whichever is the leader signs rekeys with its OWN key; no
controller holds another's private key. Each controller's rekey key is certified by the group
CA: an X.509 certificate whose subject is the controller's name, whose public key is the
Ed25519 rekey key, and whose extended key usage is ``REKEY_SIGNING``. Controllers send all of
them in ``Registered.rekey_certs`` (DER); a member accepts a rekey key only if its certificate
verifies here against the member's own copy of the CA certificate.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from groupsec.errors import BadRekey

# An OID under 2.25 (UUID-derived, ITU-T X.667): no registration needed.
REKEY_SIGNING = x509.ObjectIdentifier("2.25.202358264313798466869975043225332484150")
MAX_CERT = 4096


def verify_rekey_cert_untrusted(der: bytes, ca: x509.Certificate, now: float) -> tuple[str, Ed25519PublicKey]:
    """(controller name, rekey public key) if ``der`` is a valid rekey certificate from ``ca``
    at ``now`` (Unix time); BadRekey(reason="bad-rekey-cert") otherwise."""
    if not isinstance(der, bytes) or len(der) > MAX_CERT:
        raise BadRekey("rekey certificate too large or not bytes", "bad-rekey-cert")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise BadRekey("rekey certificate not issued by our CA (or malformed)", "bad-rekey-cert") from None
    if REKEY_SIGNING not in eku:
        raise BadRekey("certificate is not for rekey signing", "bad-rekey-cert")
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
        raise BadRekey("rekey certificate expired or not yet valid", "bad-rekey-cert")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise BadRekey("rekey certificate key is not Ed25519", "bad-rekey-cert")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(cns[0].value) if cns else ""), key
