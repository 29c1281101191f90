"""groupsec inspect: verdicts for captures of traffic sealed by our engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from groupsec import pcap, uat
from groupsec.cli import main
from groupsec.errors import ConfigError
from groupsec.inspect import inspect_capture
from groupsec.ipsec.ip import build_udp_packet
from groupsec.ipsec.packet import protect
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.suites import SUITES

NOW = 1_700_000_000.0


def _params(suite: str, spi: int, dst: str, **kw) -> SAParams:
    s = SUITES[suite]
    return SAParams(spi=spi, protocol=s.protocol, suite=suite, mode=kw.pop("mode", "transport"), dst=dst,
                    enc_key=os.urandom(s.enc_key_len), auth_key=os.urandom(s.auth_key_len), **kw)


def _seal(params: SAParams, payloads: list[bytes], src: str = "10.0.0.1", sender_id: int | None = None) -> list[bytes]:
    sa = SecurityAssociation(replace(params, sender_id=sender_id) if sender_id else params, "out", NOW)
    return [protect(sa, build_udp_packet(src, params.dst, 5000, 5001, p), NOW + i) for i, p in enumerate(payloads)]


def _capture(packets: list[bytes], linktype: int = pcap.LINKTYPE_RAW) -> bytes:
    wrap = {pcap.LINKTYPE_RAW: lambda p: p, pcap.LINKTYPE_ETHERNET: pcap.ethernet_frame,
            pcap.LINKTYPE_LINUX_SLL: pcap.linux_sll_frame}[linktype]
    return pcap.pcap_bytes([(NOW + i / 100, wrap(p)) for i, p in enumerate(packets)], linktype=linktype)


def _keys(sas: list[SAParams]) -> list[uat.KeyEntry]:
    return uat.parse_esp_sa_untrusted(uat.format_esp_sa(sas))


CASES = [
    ("aes-gcm-16-128", "239.1.2.3", {"mode": "tunnel", "udp_encap_port": 4500}),
    ("aes-gcm-16-256", "ff0e::1:2", {"mode": "transport"}),
    ("aes-cbc-128-hmac-sha-256", "239.1.2.3", {"mode": "transport", "udp_encap_port": 4500}),
    ("aes-cbc-256-hmac-sha-512", "ff0e::1:2", {"mode": "tunnel"}),
    ("null-hmac-sha-256", "239.1.2.3", {"mode": "transport"}),
    ("aes-gmac-128", "239.1.2.3", {"mode": "tunnel"}),
    ("chacha20-poly1305", "239.1.2.3", {"mode": "transport", "udp_encap_port": 4500}),
    ("hmac-sha-256-128", "239.1.2.3", {"mode": "transport"}),
    ("hmac-sha-512-256", "ff0e::1:2", {"mode": "tunnel"}),
]


@pytest.mark.parametrize(("suite", "dst", "kw"), CASES, ids=[c[0] + "-" + c[2]["mode"] for c in CASES])
@pytest.mark.parametrize("linktype", [pcap.LINKTYPE_RAW, pcap.LINKTYPE_ETHERNET, pcap.LINKTYPE_LINUX_SLL])
def test_every_packet_of_sealed_traffic_is_ok(suite: str, dst: str, kw: dict, linktype: int) -> None:
    src = "fd00::7" if ":" in dst else "10.0.0.7"
    params = _params(suite, 0x1000, dst, **kw)
    payloads = [b"frame %d " % i + os.urandom(i * 7) for i in range(12)]
    wire = _seal(params, payloads, src=src)
    plain = build_udp_packet(src, dst, 1, 2, b"not ipsec")
    verdicts = inspect_capture(_capture([plain, *wire], linktype), _keys([params]))
    assert [v.verdict for v in verdicts] == ["ok"] * len(payloads)  # the plain UDP packet is not listed
    assert [v.payload for v in verdicts] == payloads
    assert [v.seq for v in verdicts] == list(range(1, 13))
    assert {v.spi for v in verdicts} == {0x1000}
    assert {v.src for v in verdicts} == {src}
    assert [v.index for v in verdicts] == list(range(2, 14))


def test_flipped_bit_duplicate_unknown_spi_and_garbage() -> None:
    known = _params("aes-gcm-16-128", 0x2000, "239.1.2.3", mode="tunnel", udp_encap_port=4500)
    other = _params("aes-gcm-16-128", 0x3000, "239.1.2.3", mode="tunnel", udp_encap_port=4500)
    good = _seal(known, [b"a", b"b", b"c", b"d"])
    flipped = bytearray(good[1])
    flipped[-20] ^= 0x01  # inside the ciphertext
    ah = _params("hmac-sha-256-128", 0x4000, "239.1.2.3")
    ah_good = _seal(ah, [b"ah1", b"ah2"])
    ah_flipped = bytearray(ah_good[1])
    ah_flipped[-1] ^= 0x80  # the UDP payload is covered by the AH ICV
    truncated_esp = good[3][:20] + b"\x00" * 0  # IPv4 header only... with a bad total length
    packets = [good[0], bytes(flipped), good[1], good[0], _seal(other, [b"x"])[0], ah_good[0], bytes(ah_flipped),
               os.urandom(3) + b"\x00" * 30, truncated_esp, good[2]]
    verdicts = inspect_capture(_capture(packets), _keys([known, ah]))
    got = [(v.index, v.verdict) for v in verdicts]
    assert got == [(1, "ok"), (2, "auth-failed"), (3, "ok"), (4, "replay"), (5, "unknown-spi"), (6, "ok"),
                   (7, "auth-failed"), (8, "malformed"), (9, "malformed"), (10, "ok")]
    assert verdicts[4].spi == 0x3000
    assert verdicts[1].payload is None


def test_esp_header_too_short_is_malformed() -> None:
    pkt = build_udp_packet("10.0.0.1", "239.1.2.3", 1, 2, b"")
    esp = bytearray(pkt[:20] + b"\x00\x00\x12\x34")
    esp[9] = 50  # protocol ESP
    esp[2:4] = len(esp).to_bytes(2, "big")
    esp[10:12] = b"\x00\x00"
    from groupsec.ipsec.ip import checksum

    esp[10:12] = checksum(bytes(esp[:20])).to_bytes(2, "big")
    (v,) = inspect_capture(_capture([bytes(esp)]), [])
    assert (v.verdict, v.protocol) == ("malformed", "esp")


def test_shared_sa_with_sender_ids_keeps_one_window_per_sender() -> None:
    shared = _params("aes-gcm-16-128", 0x5000, "239.1.2.3", sender_id_bits=8)
    a = _seal(shared, [b"a1", b"a2"], src="10.0.0.1", sender_id=1)
    b = _seal(shared, [b"b1", b"b2"], src="10.0.0.2", sender_id=2)
    verdicts = inspect_capture(_capture([a[0], b[0], a[1], b[1], b[1]]), _keys([shared]))
    assert [(v.verdict, v.sender_id, v.seq) for v in verdicts] == [
        ("ok", 1, 1), ("ok", 2, 1), ("ok", 1, 2), ("ok", 2, 2), ("replay", 2, 2)]


def test_plain_wireshark_record_without_mode_still_decodes_tunnels() -> None:
    params = _params("aes-gcm-16-128", 0x6000, "239.1.2.3", mode="tunnel")
    record = uat.esp_sa_record(params)
    assert record is not None
    verdicts = inspect_capture(_capture(_seal(params, [b"one", b"two"])), uat.parse_esp_sa_untrusted(record))
    assert [(v.verdict, v.payload) for v in verdicts] == [("ok", b"one"), ("ok", b"two")]
    assert verdicts[0].inner == "udp 10.0.0.1:5000 -> 239.1.2.3:5001"


def test_esp_in_udp_on_a_custom_port_is_found_by_spi() -> None:
    params = _params("aes-gcm-16-128", 0x7000, "239.1.2.3", udp_encap_port=14500)
    text = uat.format_esp_sa([params])
    plain = "\n".join(line for line in text.splitlines() if not line.startswith("#"))  # no hints
    verdicts = inspect_capture(_capture(_seal(params, [b"p"])), uat.parse_esp_sa_untrusted(plain))
    assert [(v.protocol, v.verdict, v.payload) for v in verdicts] == [("esp-in-udp", "ok", b"p")]


def test_malformed_capture_file_is_a_configerror() -> None:
    with pytest.raises(ConfigError, match=r"^cap\.pcap: not a pcap or pcapng file"):
        inspect_capture(b"this is not a capture at all", [], name="cap.pcap")
    with pytest.raises(ConfigError, match=r"^cap\.pcap: truncated capture: record 1"):
        inspect_capture(_capture([b"\x45" * 40])[:-5], [], name="cap.pcap")


@pytest.fixture
def files(tmp_path):
    params = _params("aes-cbc-128-hmac-sha-256", 0x8000, "239.1.2.3", mode="tunnel", udp_encap_port=4500)
    wire = _seal(params, [b"hello", b"world"])
    cap = tmp_path / "c.pcap"
    cap.write_bytes(_capture([wire[0], wire[1], wire[1]], pcap.LINKTYPE_ETHERNET))
    keys = tmp_path / "esp_sa"
    uat.write_esp_sa(str(keys), [params])
    return cap, keys


def test_cli_json(files, capsys) -> None:
    cap, keys = files
    assert main(["inspect", str(cap), "--keys", str(keys), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [{k: p[k] for k in ("index", "spi", "seq", "verdict", "payload_hex")} for p in doc["packets"]] == [
        {"index": 1, "spi": 0x8000, "seq": 1, "verdict": "ok", "payload_hex": b"hello".hex()},
        {"index": 2, "spi": 0x8000, "seq": 2, "verdict": "ok", "payload_hex": b"world".hex()},
        {"index": 3, "spi": 0x8000, "seq": 2, "verdict": "replay", "payload_hex": None},
    ]


def test_cli_table(files, capsys) -> None:
    cap, keys = files
    assert main(["inspect", str(cap), "--keys", str(keys)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "spi=0x00008000" in out[0]
    assert "|hello|" in out[0]
    assert "replay" in out[2]
    assert out[-1] == "3 IPsec packets: 2 ok, 1 replay"


@pytest.mark.parametrize("content", [b"", b"\xd4\xc3\xb2\xa1garbage", b"\x0a\x0d\x0d\x0a\xff\xff\xff\xff"])
def test_cli_malformed_capture_one_line_no_traceback(tmp_path, files, content: bytes) -> None:
    _, keys = files
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(content)
    res = subprocess.run([sys.executable, "-m", "groupsec.cli", "inspect", str(bad), "--keys", str(keys)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"groupsec inspect: error: {bad}: ")
    assert "Traceback" not in res.stderr


def test_cli_missing_files_and_bad_key_file(tmp_path, files, capsys) -> None:
    cap, keys = files
    assert main(["inspect", str(tmp_path / "nope.pcap"), "--keys", str(keys)]) == 2
    assert "cannot read capture" in capsys.readouterr().err
    badkeys = tmp_path / "k"
    badkeys.write_text('"IPv4","*","*","0x100","ROT13","","NULL",""\n')
    assert main(["inspect", str(cap), "--keys", str(badkeys)]) == 2
    err = capsys.readouterr().err
    assert f"{badkeys}:1: unsupported algorithms 'ROT13'" in err
