"""A small typed codec for NETLINK_XFRM: the one module of groupsec that talks to netlink.

It knows the few messages the XFRM data path needs: NEWSA/UPDSA/DELSA/GETSA (and dumps),
NEWPOLICY/UPDPOLICY/DELPOLICY/GETPOLICY (and dumps). Struct layouts follow
``include/uapi/linux/xfrm.h`` on Linux (natural alignment, as on every 64-bit ABI Linux
runs XFRM on). Kernel answers are length-checked before they are sliced; a malformed one
raises :class:`XfrmError`, never ``struct.error``. Key material lives only in
:class:`Algo` (``repr`` redacted) and is never logged.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from agent.datapath.sockets import family_of
from groupsec.errors import GroupSecError

NETLINK_XFRM = 6
NETLINK_EXT_ACK = 11
SOL_NETLINK = 270

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSGERR_ATTR_MSG = 1

XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_GETSA = 0x10, 0x11, 0x12
XFRM_MSG_NEWPOLICY, XFRM_MSG_DELPOLICY, XFRM_MSG_GETPOLICY = 0x13, 0x14, 0x15
XFRM_MSG_UPDPOLICY, XFRM_MSG_UPDSA = 0x19, 0x1A

XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ENCAP, XFRMA_TMPL = 1, 2, 4, 5
XFRMA_ALG_AEAD, XFRMA_ALG_AUTH_TRUNC, XFRMA_MARK, XFRMA_REPLAY_ESN_VAL = 18, 20, 21, 23

XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL = 0, 1
XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_FWD = 0, 1, 2
XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK = 0, 1
XFRM_STATE_ALIGN4, XFRM_STATE_ESN = 0x40, 0x80
UDP_ENCAP_ESPINUDP = 2
XFRM_INF = 0xFFFFFFFFFFFFFFFF
XFRMA_REPLAY_ESN_MAX = 4096  # bits
IPPROTO_ESP, IPPROTO_AH = 50, 51
PROTO_NUMBERS = {"esp": IPPROTO_ESP, "ah": IPPROTO_AH}

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_SELECTOR = struct.Struct("=16s16sHHHHHBBB3xiI")  # 56
_XFRM_ID = struct.Struct("=16sIB3x")  # 24 (spi is big-endian: packed separately)
_LFT_CFG = struct.Struct("=8Q")  # 64
_LFT_CUR = struct.Struct("=4Q")  # 32
_STATS = struct.Struct("=3I")  # 12
_USERSA_INFO = struct.Struct("=56s24s16s64s32s12sIIHBBB7x")  # 224
_USERSA_ID = struct.Struct("=16s4sHBx")  # 24
_USERPOLICY_INFO = struct.Struct("=56s64s32sIIBBBB4x")  # 168
_USERPOLICY_ID = struct.Struct("=56sIB3x")  # 64
_USER_TMPL = struct.Struct("=24sH2x16sIBBBxIII")  # 64
_ALGO_NAME = struct.Struct("=64sI")  # xfrm_algo header (+ key)
_ALGO_NAME2 = struct.Struct("=64sII")  # xfrm_algo_auth / xfrm_algo_aead header (+ key)
_ENCAP = struct.Struct("=HHH2x16s")  # 24 (ports big-endian)
_REPLAY_ESN = struct.Struct("=6I")  # + bitmap
_MARK = struct.Struct("=II")
assert (_USERSA_INFO.size, _USERPOLICY_INFO.size, _USER_TMPL.size) == (224, 168, 64)


class XfrmError(GroupSecError):
    """The kernel refused an XFRM request (``errno`` and, if given, the kernel's extack message)."""

    reason = "xfrm"

    def __init__(self, message: str, err: int = 0, op: str = "") -> None:
        super().__init__(message)
        self.errno = err
        self.op = op


class XfrmNotFound(XfrmError):
    """No such SA or policy (ENOENT/ESRCH)."""


class XfrmExists(XfrmError):
    """An SA with that (dst, SPI, protocol) or a policy with that selector exists (EEXIST)."""


class XfrmUnsupported(XfrmError):
    """The kernel lacks the protocol, mode or algorithm (esp4/ah4/esp6/ah6/xfrm_user, crypto modules)."""


def _error_for(err: int, op: str, msg: str) -> XfrmError:
    text = f"XFRM {op}: {os.strerror(err)}" + (f" ({msg})" if msg else "")
    if err in (errno.ENOENT, errno.ESRCH):
        return XfrmNotFound(text, err, op)
    if err == errno.EEXIST:
        return XfrmExists(text, err, op)
    if err in (errno.EPROTONOSUPPORT, errno.ENOSYS, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
        return XfrmUnsupported(text, err, op)
    return XfrmError(text, err, op)


# --- addresses -------------------------------------------------------------------------


def _pack_addr(addr: str | None) -> bytes:
    if not addr:
        return bytes(16)
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def _unpack_addr(raw: bytes, family: int) -> str:
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv4Address(raw[:4]))


# --- the structures ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selector:
    """``struct xfrm_selector``: which packets a policy (or an SA's inner traffic) covers."""

    family: int
    daddr: str
    saddr: str
    prefixlen_d: int = 0
    prefixlen_s: int = 0
    proto: int = 0
    dport: int = 0
    sport: int = 0
    ifindex: int = 0

    def pack(self) -> bytes:
        return _SELECTOR.pack(
            _pack_addr(self.daddr), _pack_addr(self.saddr),
            socket.htons(self.dport), socket.htons(0xFFFF if self.dport else 0),
            socket.htons(self.sport), socket.htons(0xFFFF if self.sport else 0),
            self.family, self.prefixlen_d, self.prefixlen_s, self.proto, self.ifindex, 0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Selector:
        d, s, dport, _dm, sport, _sm, fam, pd, ps, proto, ifindex, _user = _SELECTOR.unpack(raw)
        fam = fam or socket.AF_INET
        return cls(fam, _unpack_addr(d, fam), _unpack_addr(s, fam), pd, ps, proto,
                   socket.ntohs(dport), socket.ntohs(sport), ifindex)


@dataclass(frozen=True, slots=True)
class LifetimeCfg:
    """``struct xfrm_lifetime_cfg``; 0 means no limit (sent as XFRM_INF)."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_add_seconds: int = 0
    hard_add_seconds: int = 0

    def pack(self) -> bytes:
        def inf(v: int) -> int:
            return v or XFRM_INF

        return _LFT_CFG.pack(inf(self.soft_bytes), inf(self.hard_bytes), inf(self.soft_packets),
                             inf(self.hard_packets), self.soft_add_seconds, self.hard_add_seconds, 0, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> LifetimeCfg:
        v = [0 if x == XFRM_INF else x for x in _LFT_CFG.unpack(raw)]
        return cls(v[0], v[1], v[2], v[3], v[4], v[5])


@dataclass(frozen=True, slots=True)
class Algo:
    """One of xfrm_algo (``kind="crypt"``), xfrm_algo_auth (``"auth"``, ``bits`` = truncation)
    or xfrm_algo_aead (``"aead"``, ``bits`` = ICV length)."""

    kind: str
    name: str
    key: bytes = field(repr=False)
    bits: int = 0

    def pack(self) -> tuple[int, bytes]:
        name = self.name.encode()
        if len(name) >= 64:
            raise XfrmError(f"algorithm name {self.name!r} is too long")
        if self.kind == "crypt":
            return XFRMA_ALG_CRYPT, _ALGO_NAME.pack(name, len(self.key) * 8) + self.key
        attr = XFRMA_ALG_AEAD if self.kind == "aead" else XFRMA_ALG_AUTH_TRUNC
        return attr, _ALGO_NAME2.pack(name, len(self.key) * 8, self.bits) + self.key


@dataclass(frozen=True, slots=True)
class Encap:
    """``struct xfrm_encap_tmpl``: ESP-in-UDP (RFC 3948) ports."""

    sport: int
    dport: int
    type: int = UDP_ENCAP_ESPINUDP

    def pack(self) -> bytes:
        return _ENCAP.pack(self.type, socket.htons(self.sport), socket.htons(self.dport), bytes(16))


@dataclass(frozen=True, slots=True)
class SAInfo:
    """``struct xfrm_usersa_info`` plus the attributes we use. ``curlft``/``stats`` are read-only
    (filled from the kernel's answers)."""

    family: int
    daddr: str
    spi: int
    proto: int
    saddr: str
    mode: int
    reqid: int
    selector: Selector
    replay_window: int = 0
    flags: int = 0
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)
    algos: tuple[Algo, ...] = field(default=(), repr=False)
    encap: Encap | None = None
    algo_names: tuple[str, ...] = ()  # from the kernel: the names of the algorithms installed
    octets: int = 0  # bytes processed (curlft.bytes)
    packets: int = 0
    add_time: int = 0
    replay_drops: int = 0
    integrity_failed: int = 0
    oseq: int = 0  # highest sequence number sent
    seq: int = 0  # highest sequence number received

    def pack(self) -> bytes:
        win = self.replay_window
        esn = win > 32 or bool(self.flags & XFRM_STATE_ESN)
        xid = _XFRM_ID.pack(_pack_addr(self.daddr), 0, self.proto)
        xid = xid[:16] + struct.pack("!I", self.spi) + xid[20:]
        body = _USERSA_INFO.pack(
            self.selector.pack(), xid, _pack_addr(self.saddr), self.lifetime.pack(), bytes(32), bytes(12),
            0, self.reqid, self.family, self.mode, 0 if esn else win, self.flags,
        )
        attrs = [a.pack() for a in self.algos]
        if self.encap is not None:
            attrs.append((XFRMA_ENCAP, self.encap.pack()))
        if esn:
            if win > XFRMA_REPLAY_ESN_MAX:
                raise XfrmError(f"replay window {win} is above the kernel's {XFRMA_REPLAY_ESN_MAX}")
            words = (win + 31) // 32
            attrs.append((XFRMA_REPLAY_ESN_VAL, _REPLAY_ESN.pack(words, 0, 0, 0, 0, win) + bytes(4 * words)))
        return body + b"".join(_attr(t, v) for t, v in attrs)

    @classmethod
    def unpack_untrusted(cls, data: bytes) -> SAInfo:
        if len(data) < _USERSA_INFO.size:
            raise XfrmError("short xfrm_usersa_info from the kernel")
        sel, xid, saddr, lft, cur, stats, _seq, reqid, fam, mode, win, flags = _USERSA_INFO.unpack_from(data)
        attrs = _parse_attrs_untrusted(data[_USERSA_INFO.size:])
        names = []
        for t in (XFRMA_ALG_AEAD, XFRMA_ALG_CRYPT, XFRMA_ALG_AUTH_TRUNC):
            if t in attrs and len(attrs[t]) >= 64:
                names.append(attrs[t][:64].split(b"\0", 1)[0].decode(errors="replace"))
        encap = None
        if XFRMA_ENCAP in attrs and len(attrs[XFRMA_ENCAP]) >= _ENCAP.size:
            etype, sp, dp, _oa = _ENCAP.unpack_from(attrs[XFRMA_ENCAP])
            encap = Encap(socket.ntohs(sp), socket.ntohs(dp), etype)
        oseq = seqn = 0
        if XFRMA_REPLAY_ESN_VAL in attrs and len(attrs[XFRMA_REPLAY_ESN_VAL]) >= _REPLAY_ESN.size:
            _bl, oseq, seqn, _oh, _sh, win = _REPLAY_ESN.unpack_from(attrs[XFRMA_REPLAY_ESN_VAL])
        nbytes, npackets, add_time, _use = _LFT_CUR.unpack(cur)
        _rw, replay, integrity = _STATS.unpack(stats)
        return cls(
            fam, _unpack_addr(xid[:16], fam), struct.unpack("!I", xid[16:20])[0], xid[20], _unpack_addr(saddr, fam),
            mode, reqid, Selector.unpack(sel), win, flags, LifetimeCfg.unpack(lft), (), encap, tuple(names),
            nbytes, npackets, add_time, replay, integrity, oseq, seqn,
        )


@dataclass(frozen=True, slots=True)
class Template:
    """``struct xfrm_user_tmpl``: what a policy requires (protocol, mode, reqid, maybe one SPI)."""

    family: int
    proto: int
    mode: int
    reqid: int
    daddr: str | None = None
    saddr: str | None = None
    spi: int = 0
    optional: bool = False

    def pack(self) -> bytes:
        xid = _pack_addr(self.daddr) + struct.pack("!I", self.spi) + bytes([self.proto]) + bytes(3)
        return _USER_TMPL.pack(xid, self.family, _pack_addr(self.saddr), self.reqid, self.mode, 0,
                               int(self.optional), 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)

    @classmethod
    def unpack(cls, raw: bytes) -> Template:
        xid, fam, saddr, reqid, mode, _share, optional, _a, _e, _c = _USER_TMPL.unpack(raw)
        fam = fam or socket.AF_INET
        return cls(fam, xid[20], mode, reqid, _unpack_addr(xid[:16], fam), _unpack_addr(saddr, fam),
                   struct.unpack("!I", xid[16:20])[0], bool(optional))


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """``struct xfrm_userpolicy_info`` plus its templates."""

    selector: Selector
    dir: int
    action: int = XFRM_POLICY_ALLOW
    priority: int = 0
    templates: tuple[Template, ...] = ()
    index: int = 0  # assigned by the kernel
    flags: int = 0
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)

    def pack(self) -> bytes:
        body = _USERPOLICY_INFO.pack(self.selector.pack(), self.lifetime.pack(), bytes(32), self.priority,
                                     self.index, self.dir, self.action, self.flags, 0)
        if self.templates:
            body += _attr(XFRMA_TMPL, b"".join(t.pack() for t in self.templates))
        return body

    @classmethod
    def unpack_untrusted(cls, data: bytes) -> PolicyInfo:
        if len(data) < _USERPOLICY_INFO.size:
            raise XfrmError("short xfrm_userpolicy_info from the kernel")
        sel, lft, _cur, prio, index, pdir, action, flags, _share = _USERPOLICY_INFO.unpack_from(data)
        attrs = _parse_attrs_untrusted(data[_USERPOLICY_INFO.size:])
        raw = attrs.get(XFRMA_TMPL, b"")
        tmpls = tuple(Template.unpack(raw[i:i + 64]) for i in range(0, len(raw) - 63, 64))
        return cls(Selector.unpack(sel), pdir, action, prio, tmpls, index, flags, LifetimeCfg.unpack(lft))


# --- netlink framing ---------------------------------------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, atype) + value + bytes(-length % 4)


def _parse_attrs_untrusted(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + _NLATTR.size <= len(data):
        length, atype = _NLATTR.unpack_from(data, off)
        if length < _NLATTR.size or off + length > len(data):
            raise XfrmError("malformed netlink attribute from the kernel")
        out[atype & 0x3FFF] = data[off + _NLATTR.size:off + length]
        off += (length + 3) & ~3
    return out


def _sa_id(daddr: str, spi: int, proto: int) -> bytes:
    return _USERSA_ID.pack(_pack_addr(daddr), struct.pack("!I", spi), family_of(daddr), proto)


class XfrmNetlink:
    """A NETLINK_XFRM socket with synchronous request/ack and dump helpers.

    Requests to the kernel finish within microseconds, so the calls are plain (sync)
    functions; the socket has a timeout so that a lost answer cannot hang the agent.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_XFRM)
        except OSError as exc:
            raise XfrmUnsupported(f"cannot open a NETLINK_XFRM socket: {exc.strerror}", exc.errno or 0, "open") from None
        self._sock.settimeout(timeout)
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except OSError:
            pass  # kernels before 4.12: errors come without a message
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> XfrmNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SAs --
    def add_sa(self, sa: SAInfo, *, update: bool = False) -> None:
        self._request(XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA, sa.pack(), "UPDSA" if update else "NEWSA")

    def delete_sa(self, daddr: str, spi: int, proto: int) -> None:
        self._request(XFRM_MSG_DELSA, _sa_id(daddr, spi, proto), "DELSA")

    def get_sa(self, daddr: str, spi: int, proto: int) -> SAInfo:
        msgs = self._exchange(XFRM_MSG_GETSA, NLM_F_REQUEST, _sa_id(daddr, spi, proto), "GETSA")
        for mtype, body in msgs:
            if mtype == XFRM_MSG_NEWSA:
                return SAInfo.unpack_untrusted(body)
        raise XfrmError("GETSA: no SA in the kernel's answer", 0, "GETSA")

    def dump_sas(self) -> list[SAInfo]:
        msgs = self._exchange(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, b"", "GETSA dump")
        return [SAInfo.unpack_untrusted(b) for t, b in msgs if t == XFRM_MSG_NEWSA]

    # -- policies --
    def add_policy(self, pol: PolicyInfo, *, update: bool = False) -> None:
        self._request(XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY, pol.pack(),
                      "UPDPOLICY" if update else "NEWPOLICY")

    def delete_policy(self, direction: int, *, selector: Selector | None = None, index: int = 0) -> None:
        """Delete by the kernel's ``index`` or, if 0, by ``selector``."""
        sel = selector.pack() if selector is not None else bytes(_SELECTOR.size)
        self._request(XFRM_MSG_DELPOLICY, _USERPOLICY_ID.pack(sel, index, direction), "DELPOLICY")

    def dump_policies(self) -> list[PolicyInfo]:
        msgs = self._exchange(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, b"", "GETPOLICY dump")
        return [PolicyInfo.unpack_untrusted(b) for t, b in msgs if t in (XFRM_MSG_NEWPOLICY, XFRM_MSG_UPDPOLICY)]

    # -- framing --
    def _request(self, mtype: int, payload: bytes, op: str) -> None:
        self._exchange(mtype, NLM_F_REQUEST | NLM_F_ACK, payload, op)

    def _exchange(self, mtype: int, flags: int, payload: bytes, op: str) -> list[tuple[int, bytes]]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), mtype, flags, seq, 0) + payload)
        dump = (flags & NLM_F_DUMP) == NLM_F_DUMP
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                raise XfrmError(f"XFRM {op}: no answer from the kernel", errno.ETIMEDOUT, op) from None
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, rtype, rflags, rseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size or off + length > len(data):
                    raise XfrmError(f"XFRM {op}: malformed netlink message from the kernel", 0, op)
                body = data[off + _NLMSGHDR.size:off + length]
                off += (length + 3) & ~3
                if rseq != seq:
                    continue  # a late answer to an earlier request
                interrupted |= bool(rflags & NLM_F_DUMP_INTR)
                if rtype == NLMSG_ERROR:
                    self._check_error(body, rflags, op)
                    return out  # an ACK
                if rtype == NLMSG_DONE:
                    if interrupted:  # the table changed during the dump: the caller may retry
                        raise XfrmError(f"XFRM {op}: dump interrupted", errno.EINTR, op)
                    return out
                out.append((rtype, body))
                if not dump and not rflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return out

    @staticmethod
    def _check_error(body: bytes, rflags: int, op: str) -> None:
        if len(body) < 4:
            raise XfrmError(f"XFRM {op}: short netlink error", 0, op)
        (err,) = struct.unpack_from("=i", body)
        if err == 0:
            return
        msg = ""
        if rflags & 0x200 and len(body) >= 4 + _NLMSGHDR.size:  # NLM_F_ACK_TLVS (after the echoed header)
            hlen = _NLMSGHDR.unpack_from(body, 4)[0]
            start = 4 + (hlen if not rflags & 0x100 else _NLMSGHDR.size)  # NLM_F_CAPPED
            try:
                tlvs = _parse_attrs_untrusted(body[start:])
            except XfrmError:
                tlvs = {}
            msg = tlvs.get(NLMSGERR_ATTR_MSG, b"").split(b"\0", 1)[0].decode(errors="replace")
        raise _error_for(-err, op, msg)
