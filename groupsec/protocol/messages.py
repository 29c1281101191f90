"""Control-protocol messages: frozen dataclasses, msgpack codec, strict validation.

Every frame is one msgpack map with a string key ``"t"`` naming the message type. Unknown
types, missing fields, wrong types, extension types and oversized containers are refused
with ``RemoteProtocolError`` (code ``bad-message``). ``decode_message_untrusted`` is the
only way bytes from the network become a message. See docs/PROTOCOL.md.

Direction: M = member -> controller, C = controller -> member.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from groupsec.errors import PolicyError, RemoteProtocolError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.policy import GroupPolicy
from groupsec.protocol.framing import MAX_FRAME

PROTOCOL_VERSION = 1
MAX_LIST = 4096
MAX_STR = 4096

# Error codes carried by Error.code (RFC 9838 notify types in spirit).
ERROR_CODES = (
    "unsupported-version",  # INVALID_MAJOR_VERSION
    "bad-message",  # INVALID_SYNTAX
    "frame-too-large",
    "unexpected-message",  # a message not allowed in the session's state
    "unknown-group",
    "not-authorized",  # AUTHORIZATION_FAILED: identity not allowed this group/role/level
    "revoked",
    "rate-limited",
    "not-leader",  # HA: this controller is a follower and cannot make that change; try another
    "not-leader",
    "internal",
)


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, "bad-message")


def _ext_hook(code: int, data: bytes) -> Any:
    raise _bad(f"msgpack extension type {code} is not allowed")


def unpack_untrusted(data: bytes) -> Any:
    if len(data) > MAX_FRAME:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds {MAX_FRAME}", "frame-too-large")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_ext_hook,
            max_bin_len=MAX_FRAME,
            max_str_len=MAX_FRAME,
            max_array_len=MAX_LIST * 4,
            max_map_len=MAX_LIST,
        )
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise _bad(f"undecodable msgpack: {type(exc).__name__}") from None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# --- field checking ----------------------------------------------------------------------

_PY = {"int": int, "str": str, "bytes": bytes, "bool": bool, "float": (int, float), "list": list, "dict": dict}


def check(d: dict[str, Any], name: str, kind: str, optional: bool = False) -> Any:
    """Return d[name] if it has the msgpack type ``kind``; raise RemoteProtocolError otherwise."""
    if name not in d or d[name] is None:
        if optional:
            return None
        raise _bad(f"missing field {name!r}")
    v = d[name]
    if kind == "int" and isinstance(v, bool):
        raise _bad(f"field {name!r} must be int")
    if not isinstance(v, _PY[kind]):  # type: ignore[arg-type]
        raise _bad(f"field {name!r} must be {kind}")
    if kind in ("str", "list", "dict") and len(v) > (MAX_STR if kind == "str" else MAX_LIST):
        raise _bad(f"field {name!r} is too long")
    if kind == "float":
        return float(v)
    return v


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {}  # field -> (kind, optional)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TYPE}
        for f in fields(self):
            d[f.name] = getattr(self, f.name)
        return d

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire_untrusted(cls, d: dict[str, Any]) -> Message:
        kw = {n: check(d, n, kind, opt) for n, (kind, opt) in cls.SCHEMA.items()}
        return cls(**kw)


@dataclass(frozen=True)
class GroupRequest:
    group: str
    role: str  # "sender" or "receiver"
    level: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"group": self.group, "role": self.role, "level": self.level}

    @classmethod
    def from_wire_untrusted(cls, d: Any) -> GroupRequest:
        if not isinstance(d, dict):
            raise _bad("group request must be a map")
        role = check(d, "role", "str")
        if role not in ("sender", "receiver"):
            raise _bad(f"role {role!r} is not one of sender, receiver")
        return cls(check(d, "group", "str"), role, check(d, "level", "str", True) or "")


@dataclass(frozen=True)
class Register(Message):
    """M: the first message of a session. The identity comes from the TLS certificate."""

    TYPE: ClassVar[str] = "register"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {
        "version": ("int", False), "groups": ("list", False), "known": ("dict", True)}
    version: int
    groups: list[dict[str, Any]]  # GroupRequest.to_wire() maps
    known: dict[str, int] | None = None  # "group/level" -> last rekey msg_id held (re-sync after restart)

    def requests(self) -> list[GroupRequest]:
        return [GroupRequest.from_wire_untrusted(g) for g in self.groups]


@dataclass(frozen=True)
class SAGrant:
    """One SA as handed to a member, with its activation window (RFC 9838 ATD/DTD)."""

    params: SAParams
    direction: str  # "in" or "out"
    activate_at: float  # controller wall-clock time from which senders use it
    deactivate_at: float | None = None  # after this, receivers drop it

    def to_wire(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "direction": self.direction,
                "activate_at": self.activate_at, "deactivate_at": self.deactivate_at}

    @classmethod
    def from_wire_untrusted(cls, d: Any) -> SAGrant:
        if not isinstance(d, dict):
            raise _bad("SA grant must be a map")
        direction = check(d, "direction", "str")
        if direction not in ("in", "out"):
            raise _bad("SA direction must be in or out")
        p = check(d, "params", "dict")
        try:
            params = SAParams.from_dict(p)
        except (PolicyError, TypeError, ValueError) as exc:
            raise _bad(f"bad SA parameters: {exc}") from None
        return cls(params, direction, check(d, "activate_at", "float"), check(d, "deactivate_at", "float", True))


@dataclass(frozen=True)
class Grant:
    """Everything a member gets for one group level: policy, SAs, KEK, sender ID."""

    policy: GroupPolicy
    role: str
    sas: tuple[SAGrant, ...]
    kek_epoch: int
    kek: bytes = field(repr=False)
    msg_id: int  # the latest rekey message ID for this group level
    sender_id: int | None = None
    sender_keys: dict[int, bytes] = field(default_factory=dict)  # source auth: sender ID/SPI -> Ed25519 public key
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. LKH path keys

    def to_wire(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "role": self.role, "sas": [s.to_wire() for s in self.sas],
                "kek_epoch": self.kek_epoch, "kek": self.kek, "msg_id": self.msg_id,
                "sender_id": self.sender_id, "extra": self.extra,
                # [[key_id, 32-byte key], ...]: a list, since control-protocol maps have string keys only
                "sender_keys": [[k, v] for k, v in sorted(self.sender_keys.items())]}

    @classmethod
    def from_wire_untrusted(cls, d: Any) -> Grant:
        if not isinstance(d, dict):
            raise _bad("grant must be a map")
        try:
            policy = GroupPolicy.from_dict(check(d, "policy", "dict"))
        except (PolicyError, TypeError, ValueError) as exc:
            raise _bad(f"bad group policy: {exc}") from None
        raw_sk = d.get("sender_keys") or []
        pairs = list(raw_sk.items()) if isinstance(raw_sk, dict) else raw_sk
        if not isinstance(pairs, list) or len(pairs) > MAX_LIST or not all(
                isinstance(p, list | tuple) and len(p) == 2 and type(p[0]) is int and 0 <= p[0] <= 0xFFFFFFFF
                and isinstance(p[1], bytes) and len(p[1]) == 32 for p in pairs):
            raise _bad("sender_keys must be a list of [key ID, 32-byte key] pairs")
        sk = {int(p[0]): p[1] for p in pairs}
        kek = check(d, "kek", "bytes")
        if len(kek) != 32:
            raise _bad("KEK must be 32 bytes")
        return cls(policy, check(d, "role", "str"),
                   tuple(SAGrant.from_wire_untrusted(s) for s in check(d, "sas", "list")),
                   check(d, "kek_epoch", "int"), kek, check(d, "msg_id", "int"),
                   check(d, "sender_id", "int", True), sk, check(d, "extra", "dict", True) or {})


@dataclass(frozen=True)
class Registered(Message):
    """C: the answer to Register: one grant per authorized group level."""

    TYPE: ClassVar[str] = "registered"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {
        "member": ("str", False), "grants": ("list", False), "rekey_public_key": ("bytes", False),
        "server_time": ("float", False), "heartbeat_interval": ("float", False), "rekey_certs": ("list", True)}
    member: str
    grants: list[dict[str, Any]]  # Grant.to_wire() maps
    rekey_public_key: bytes  # Ed25519, raw 32 bytes
    server_time: float
    heartbeat_interval: float
    # HA: every controller's CA-certified rekey key (DER, groupsec.protocol.rekeycert); None: one controller
    rekey_certs: list[bytes] | None = None

    def grant_objects(self) -> list[Grant]:
        return [Grant.from_wire_untrusted(g) for g in self.grants]


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"code": ("str", False), "message": ("str", False)}
    code: str
    message: str


@dataclass(frozen=True)
class RekeyPush(Message):
    """C: the signed rekey datagram (exactly the bytes multicast on the rekey channel)."""

    TYPE: ClassVar[str] = "rekey"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"datagram": ("bytes", False)}
    datagram: bytes


@dataclass(frozen=True)
class Ack(Message):
    """M: acknowledges a rekey (RFC 8263 idea)."""

    TYPE: ClassVar[str] = "ack"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {
        "group": ("str", False), "level": ("str", False), "msg_id": ("int", False), "kek_epoch": ("int", False)}
    group: str
    level: str
    msg_id: int
    kek_epoch: int


@dataclass(frozen=True)
class Resync(Message):
    """M: asks for every rekey after ``since_msg_id`` (gap or heartbeat showed one missing)."""

    TYPE: ClassVar[str] = "resync"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {
        "group": ("str", False), "level": ("str", False), "since_msg_id": ("int", False)}
    group: str
    level: str
    since_msg_id: int


@dataclass(frozen=True)
class ResyncReply(Message):
    """C: a fresh grant for the group level (the member replaces its state with it)."""

    TYPE: ClassVar[str] = "resync-reply"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"grant": ("dict", False)}
    grant: dict[str, Any]


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"nonce": ("int", False)}
    nonce: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"nonce": ("int", False)}
    nonce: int


@dataclass(frozen=True)
class Bye(Message):
    TYPE: ClassVar[str] = "bye"
    SCHEMA: ClassVar[dict[str, tuple[str, bool]]] = {"reason": ("str", True)}
    reason: str | None = None


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Register, Registered, Error, RekeyPush, Ack, Resync, ResyncReply, Ping, Pong, Bye)
}


def decode_message_untrusted(frame: bytes) -> Message:
    obj = unpack_untrusted(frame)
    if not isinstance(obj, dict):
        raise _bad("a message must be a msgpack map")
    t = obj.get("t")
    cls = MESSAGE_TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise _bad(f"unknown message type {t!r}"[:200])
    return cls.from_wire_untrusted(obj)
