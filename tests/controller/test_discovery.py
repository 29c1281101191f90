"""Zeroconf: the controller advertises _groupsec._tcp.local. with its protocol version and CA
fingerprint (python-zeroconf's thread driven through trio.to_thread)."""

from __future__ import annotations

import trio

from groupsec.controller.discovery import SERVICE, advertise


async def test_advertisement_carries_version_and_ca_fingerprint(nursery):
    from zeroconf import Zeroconf

    fp = "ab" * 32
    await nursery.start(advertise, 17443, fp, "groupsec-test-ctl")

    def lookup():
        zc = Zeroconf(interfaces=["127.0.0.1"])
        try:
            return zc.get_service_info(SERVICE, f"groupsec-test-ctl.{SERVICE}", timeout=3000)
        finally:
            zc.close()

    info = await trio.to_thread.run_sync(lookup)
    assert info is not None
    assert info.port == 17443
    assert info.properties[b"version"] == b"1"
    assert info.properties[b"ca"] == fp.encode()
    nursery.cancel_scope.cancel()
