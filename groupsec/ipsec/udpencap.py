"""UDP encapsulation of ESP (RFC 3948), for data paths that cannot send raw ESP.

A UDP datagram on the encapsulation port carries one of: an ESP packet (a non-zero SPI
first), a non-ESP marker (four zero bytes, then IKE or our control traffic), or a NAT
keepalive (the single byte 0xFF).
"""

from __future__ import annotations

from typing import Literal

from groupsec.errors import BadPacket
from groupsec.ipsec.ip import build_udp_packet

ESP_IN_UDP_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
KEEPALIVE = b"\xff"

Kind = Literal["esp", "non-esp", "keepalive"]


def classify_untrusted(udp_payload: bytes | memoryview) -> Kind:
    """What an ESP-in-UDP port received. Raises ``BadPacket`` for anything else."""
    n = len(udp_payload)
    if n == 1 and udp_payload[0] == 0xFF:
        return "keepalive"
    if n >= 4 and bytes(udp_payload[:4]) == NON_ESP_MARKER:
        return "non-esp"
    if n >= 8:
        return "esp"
    raise BadPacket("UDP-encapsulated packet too short")


def decap_untrusted(udp_payload: bytes | memoryview) -> memoryview:
    """The ESP core inside an ESP-in-UDP payload (``BadPacket`` if it is not ESP)."""
    if classify_untrusted(udp_payload) != "esp":
        raise BadPacket("not an ESP packet")
    return memoryview(udp_payload)


def frame_non_esp(payload: bytes) -> bytes:
    """Prefix the non-ESP marker, so that non-ESP traffic can share the port."""
    return NON_ESP_MARKER + payload


def build_esp_in_udp(src: str, dst: str, esp: bytes, sport: int = ESP_IN_UDP_PORT, dport: int = ESP_IN_UDP_PORT,
                     ttl: int = 64) -> bytes:
    """A whole IP/UDP packet carrying ``esp`` (checksummed; RFC 3948 allows 0 for IPv4, we compute it)."""
    if len(esp) < 8 or esp[:4] == NON_ESP_MARKER:
        raise BadPacket("not an ESP packet")
    return build_udp_packet(src, dst, sport, dport, esp, ttl=ttl)
