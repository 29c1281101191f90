"""groupsec.uat: Wireshark esp_sa key files, written by us and read back (ours and hand-written)."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupsec import uat
from groupsec.errors import BadPacket, ConfigError, GroupSecError
from groupsec.ipsec.params import SAParams
from groupsec.ipsec.suites import SUITES


def _sa(suite: str, spi: int = 0x1234, dst: str = "239.1.2.3", **kw) -> SAParams:
    s = SUITES[suite]
    return SAParams(spi=spi, protocol=s.protocol, suite=suite, mode=kw.pop("mode", "transport"), dst=dst,
                    enc_key=os.urandom(s.enc_key_len), auth_key=os.urandom(s.auth_key_len), **kw)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_roundtrips(suite: str) -> None:
    sa = _sa(suite, mode="tunnel", replay_window=128, group="video", level="hd", src="10.0.0.7")
    (entry,) = uat.parse_esp_sa_untrusted(uat.format_esp_sa([sa]))
    assert entry.suite == suite
    assert (entry.spi, entry.dst, entry.src, entry.mode) == (0x1234, "239.1.2.3", "10.0.0.7", "tunnel")
    assert (entry.replay_window, entry.group, entry.level) == (128, "video", "hd")
    back = entry.sa_params(0x1234, "239.1.2.3", src="10.0.0.7")
    assert (back.enc_key, back.auth_key) == (sa.enc_key, sa.auth_key)


def test_wireshark_columns_and_names() -> None:
    gcm = _sa("aes-gcm-16-128")
    assert uat.esp_sa_record(gcm) == (
        f'"IPv4","*","239.1.2.3","0x00001234","AES-GCM with 16 octet ICV [RFC4106]","0x{gcm.enc_key.hex()}",'
        '"NULL",""'
    )
    cbc = _sa("aes-cbc-128-hmac-sha-256", dst="ff0e::1:2", spi=0xDEADBEEF)
    assert uat.esp_sa_record(cbc) == (
        f'"IPv6","*","ff0e::1:2","0xdeadbeef","AES-CBC [RFC3602]","0x{cbc.enc_key.hex()}",'
        f'"HMAC-SHA-256-128 [RFC4868]","0x{cbc.auth_key.hex()}"'
    )
    # Wireshark 4.0 cannot decode these: they go to a comment line only
    for suite in ("aes-gmac-128", "hmac-sha-256-128", "chacha20-poly1305"):
        text = uat.format_esp_sa([_sa(suite)])
        assert all(line.startswith("#") for line in text.splitlines())
    assert "ChaCha20 with Poly1305 [RFC7634]" in uat.esp_sa_record(_sa("chacha20-poly1305"), chacha=True)


def test_handwritten_wireshark_file_with_wildcards() -> None:
    key = bytes(range(20))
    text = "\n".join([
        "# a comment",
        f'"IPv4","*","*","*","AES-GCM with 16 octet ICV [RFC4106]","0x{key.hex()}","NULL",""',
        f'"IPv4","10.0.0.0/8","239.1.2.3","0x0000****","AES-CBC [RFC3602]","0x{bytes(32).hex()}",'
        f'"HMAC-SHA-512-256 [RFC4868]","0x{bytes(64).hex()}","32-bit","0"',
        f'"Any","*","*","4660","NULL","","HMAC-SHA-256-128 [RFC4868]","0x{bytes(32).hex()}"',
    ])
    any_gcm, cbc, null = uat.parse_esp_sa_untrusted(text)
    assert any_gcm.suite == "aes-gcm-16-128"
    assert any_gcm.spi is None
    assert any_gcm.mode is None
    assert any_gcm.matches(0x99999, "1.2.3.4", "239.9.9.9")
    assert not any_gcm.matches(0x99999, "fd00::1", "ff0e::1")  # IPv4 only
    assert not any_gcm.matches(0x99999, "1.2.3.4", "239.9.9.9", protocol="ah")
    assert cbc.suite == "aes-cbc-256-hmac-sha-512"
    assert cbc.matches(0x1234, "10.9.9.9", "239.1.2.3")
    assert not cbc.matches(0x11234, "10.9.9.9", "239.1.2.3")
    assert not cbc.matches(0x1234, "11.0.0.1", "239.1.2.3")
    assert null.suite == "null-hmac-sha-256"
    assert null.spi == 4660
    assert null.matches(4660, "fd00::1", "ff0e::1")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('"IPv4","*","*","0x1"', "4 fields"),
        ('"IPv5","*","*","0x100","NULL","","HMAC-SHA-256-128 [RFC4868]","0x00"', "protocol"),
        ('"IPv4","*","*","0x100","AES-CTR [RFC3686]","0x00","NULL",""', "unsupported algorithms"),
        ('"IPv4","*","*","0x100","AES-GCM with 16 octet ICV [RFC4106]","0x0011","NULL",""', "AES-GCM key of 2"),
        ('"IPv4","*","*","0xzz","AES-GCM with 16 octet ICV [RFC4106]","0x' + "00" * 20 + '","NULL",""', "SPI"),
        ('"IPv4","nothere","*","0x100","AES-GCM with 16 octet ICV [RFC4106]","0x' + "00" * 20 + '","NULL",""',
         "not an address"),
        ('"IPv4","*","ff0e::1","0x100","AES-GCM with 16 octet ICV [RFC4106]","0x' + "00" * 20 + '","NULL",""',
         "not IPv4"),
        ('"IPv4","*","*","0x100","AES-GCM with 16 octet ICV [RFC4106]","0xqq","NULL",""', "not hex"),
        ('"IPv4,"*"', "expected ','"),
        ('"IPv4","*', "unterminated"),
        ('"IPv4","*","*","0x100","NULL","","HMAC-SHA-256-128 [RFC4868]","0x00"', "integrity key must be 32"),
        ('"IPv4","*","*","0x10","NULL","","HMAC-SHA-256-128 [RFC4868]","0x' + "00" * 32 + '"', "reserved"),
    ],
)
def test_bad_lines_name_the_line(line: str, fragment: str) -> None:
    with pytest.raises(BadPacket, match=fragment) as info:
        uat.parse_esp_sa_untrusted("# header\n" + line, name="keys.txt")
    assert str(info.value).startswith("keys.txt:2:")


def test_hint_that_contradicts_the_record_is_refused() -> None:
    text = uat.format_esp_sa([_sa("aes-gcm-16-128")]).replace("suite=aes-gcm-16-128", "suite=aes-gcm-16-256")
    with pytest.raises(BadPacket, match="does not match"):
        uat.parse_esp_sa_untrusted(text)


def test_written_file_is_0600_and_load_errors_are_configerrors(tmp_path) -> None:
    path = tmp_path / "esp_sa"
    uat.write_esp_sa(str(path), [_sa("aes-gcm-16-256")])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert uat.load_esp_sa(str(path))[0].suite == "aes-gcm-16-256"
    with pytest.raises(ConfigError, match="cannot read key file"):
        uat.load_esp_sa(str(tmp_path / "missing"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a text file"):
        uat.load_esp_sa(str(tmp_path / "bin"))


def test_repr_never_shows_keys() -> None:
    sa = _sa("aes-gcm-16-128")
    (entry,) = uat.parse_esp_sa_untrusted(uat.format_esp_sa([sa]))
    assert sa.enc_key.hex() not in repr(entry)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_our_errors(text: str) -> None:
    try:
        uat.parse_esp_sa_untrusted(text)
    except GroupSecError:
        pass
