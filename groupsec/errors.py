"""The one exception hierarchy of groupsec.

Parsers of untrusted bytes (functions whose names end in ``_untrusted``) raise only
subclasses of :class:`GroupSecError`, never ``IndexError`` or ``struct.error``.
Every packet-drop error carries a short, stable ``reason`` string that is used as the
key of the drop counters (``stats["drops"][reason]``).
"""

from __future__ import annotations


class GroupSecError(Exception):
    """Base of every error groupsec raises on purpose."""

    reason = "error"


# --- packet path -----------------------------------------------------------------------


class PacketDropped(GroupSecError):
    """A packet was refused. ``reason`` names the drop counter."""

    reason = "dropped"


class BadPacket(PacketDropped):
    """Malformed bytes: truncated, wrong lengths, bad padding, wrong version."""

    reason = "malformed"


class AuthenticationFailed(PacketDropped):
    """The ICV did not verify. Carries no detail on purpose."""

    reason = "auth-failed"


class SourceAuthFailed(AuthenticationFailed):
    """The group ICV verified but the per-sender signature did not."""

    reason = "source-auth-failed"


class ReplayDetected(PacketDropped):
    reason = "replay"


class UnknownSPI(PacketDropped):
    reason = "unknown-spi"


class SAExpired(PacketDropped):
    """The SA reached a hard lifetime (or its sequence number space is exhausted)."""

    reason = "sa-expired"


class PolicyViolation(PacketDropped):
    """Traffic matched a PROTECT or DISCARD selector and arrived unprotected (fail closed)."""

    reason = "policy"


# --- configuration and policy ----------------------------------------------------------


class PolicyError(GroupSecError, ValueError):
    """An unsafe or impossible SA/SPD configuration was refused."""

    reason = "policy-error"


class ConfigError(GroupSecError):
    """A user's configuration file or flag is wrong. ``str()`` is one line for the user."""

    reason = "config"


# --- control protocol ------------------------------------------------------------------


class ProtocolError(GroupSecError):
    reason = "protocol"


class LocalProtocolError(ProtocolError):
    """The caller misused the API (our own bug or misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid."""

    def __init__(self, message: str, code: str = "bad-message") -> None:
        super().__init__(message)
        self.code = code


class BadRekey(GroupSecError):
    """A rekey message was rejected (bad signature, replayed/old message ID, wrong group,
    undecryptable). ``reason`` is the counter key."""

    def __init__(self, message: str, reason: str = "bad-rekey") -> None:
        super().__init__(message)
        self.reason = reason
