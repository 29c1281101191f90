"""Interop with Wireshark's ESP dissector: tshark opens the captures and key files we write.

Our engine seals the traffic, groupsec.pcap writes the capture and groupsec.uat the esp_sa
key file; tshark (an independent decoder) must decrypt every ESP packet, check its ICV, and
find exactly the payload we sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from groupsec import pcap, uat
from groupsec.ipsec.ip import build_udp_packet
from groupsec.ipsec.packet import protect
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.sa import SecurityAssociation
from groupsec.ipsec.suites import SUITES

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (apt-get install tshark)")

NOW = 1_700_000_000.0
WIRESHARK_SUITES = [s for s in SUITES if uat.wireshark_algorithms(s) is not None]


def _params(suite: str, spi: int, dst: str, **kw) -> SAParams:
    s = SUITES[suite]
    return SAParams(spi=spi, protocol=s.protocol, suite=suite, mode=kw.pop("mode", "transport"), dst=dst,
                    enc_key=os.urandom(s.enc_key_len), auth_key=os.urandom(s.auth_key_len), **kw)


def _tshark(capture: Path, config_dir: Path | None, extra: list[str] = ()) -> list[list[str]]:
    env = dict(os.environ)
    if config_dir is not None:
        env["WIRESHARK_CONFIG_DIR"] = str(config_dir)
    cmd = ["tshark", "-n", "-r", str(capture), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", *extra,
           "-T", "fields", "-E", "occurrence=l", "-e", "esp.spi", "-e", "esp.sequence", "-e", "esp.icv_good",
           "-e", "udp.payload"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()]


def _sent(params: SAParams, payloads: list[bytes], src: str, sender_id: int | None = None) -> list[bytes]:
    sa = SecurityAssociation(replace(params, sender_id=sender_id) if sender_id else params, "out", NOW)
    return [protect(sa, build_udp_packet(src, params.dst, 5000, 5001, p), NOW) for p in payloads]


@pytest.mark.parametrize("suite", WIRESHARK_SUITES)
def test_tshark_decrypts_every_suite_mode_family_and_encapsulation(tmp_path: Path, suite: str) -> None:
    groups = []
    frames = []
    for i, (mode, dst, encap) in enumerate([("transport", "239.1.2.3", None), ("tunnel", "239.1.2.4", 4500),
                                            ("tunnel", "ff0e::1:2", None), ("transport", "ff0e::1:3", 4500)]):
        params = _params(suite, 0x10000 + i, dst, mode=mode, udp_encap_port=encap)
        src = "fd00::9" if ":" in dst else "10.0.0.9"
        payloads = [f"{suite} {mode} {dst} #{n}".encode() + os.urandom(n * 5) for n in range(5)]
        groups.append((params, payloads))
        frames += [pcap.ethernet_frame(p) for p in _sent(params, payloads, src)]
    cap = tmp_path / "c.pcap"
    cap.write_bytes(pcap.pcap_bytes([(NOW + n / 1000, f) for n, f in enumerate(frames)], pcap.LINKTYPE_ETHERNET))
    conf = tmp_path / "wireshark"
    conf.mkdir()
    uat.write_esp_sa(str(conf / "esp_sa"), [p for p, _ in groups])
    rows = _tshark(cap, conf)
    expected = [[f"0x{p.spi:08x}", str(seq), "1", payload.hex()]
                for p, payloads in groups for seq, payload in enumerate(payloads, 1)]
    assert rows == expected


def test_tshark_uat_command_line_options_and_sender_ids(tmp_path: Path) -> None:
    shared = _params("aes-gcm-16-128", 0x4242, "239.9.9.9", sender_id_bits=8, udp_encap_port=4500)
    a = _sent(shared, [b"from a 1", b"from a 2"], "10.0.0.1", sender_id=1)
    b = _sent(shared, [b"from b 1"], "10.0.0.2", sender_id=2)
    cap = tmp_path / "c.pcap"
    cap.write_bytes(pcap.pcap_bytes([(NOW, a[0]), (NOW + 1, b[0]), (NOW + 2, a[1])]))
    rows = _tshark(cap, tmp_path / "empty-profile", uat.tshark_uat_options([shared]))
    assert [r[3] for r in rows] == [b"from a 1".hex(), b"from b 1".hex(), b"from a 2".hex()]
    assert {r[2] for r in rows} == {"1"}


def test_tshark_rejects_a_wrong_key(tmp_path: Path) -> None:
    """The check above can fail: with another key, tshark finds no payload and a bad ICV."""
    params = _params("aes-cbc-128-hmac-sha-256", 0x999, "239.1.2.3")
    cap = tmp_path / "c.pcap"
    cap.write_bytes(pcap.pcap_bytes([(NOW, p) for p in _sent(params, [b"secret"], "10.0.0.1")]))
    wrong = replace(params, auth_key=os.urandom(32))
    rows = _tshark(cap, tmp_path / "empty-profile", uat.tshark_uat_options([wrong]))
    assert rows[0][2] == "0"


@pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap (wireshark-common) is not installed")
def test_inspect_reads_a_pcapng_written_by_wireshark_tools(tmp_path: Path) -> None:
    from groupsec.inspect import inspect_capture

    params = _params("aes-gcm-16-256", 0x5151, "239.1.2.3", mode="tunnel", udp_encap_port=4500)
    sent = [b"one", b"two", b"three"]
    cap = tmp_path / "c.pcap"
    cap.write_bytes(pcap.pcap_bytes([(NOW + i, pcap.linux_sll_frame(p)) for i, p in
                                     enumerate(_sent(params, sent, "10.0.0.1"))], pcap.LINKTYPE_LINUX_SLL))
    ng = tmp_path / "c.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(cap), str(ng)], check=True, capture_output=True, timeout=60)
    assert ng.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    verdicts = inspect_capture(ng.read_bytes(), uat.parse_esp_sa_untrusted(uat.format_esp_sa([params])))
    assert [(v.verdict, v.payload) for v in verdicts] == [("ok", p) for p in sent]
    assert verdicts[0].timestamp == pytest.approx(NOW)
