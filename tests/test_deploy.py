"""deploy/: the systemd units are valid and hardened, and the example configurations load."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
EXAMPLES = sorted(p for p in (DEPLOY / "examples").iterdir() if p.is_dir())


def _unit(path: Path) -> dict[str, list[str]]:
    """Service-section settings as systemd reads them (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_three_units_exist() -> None:
    assert {p.name for p in UNITS} == {
        "groupsec-controller.service", "groupsec-agent@.service", "groupsec-agent-kernel@.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(path: Path) -> None:
    u = _unit(path)
    assert u["Service.User"] == ["groupsec"] or u.get("Service.DynamicUser") == ["yes"]
    assert u["Service.ProtectSystem"] == ["strict"]
    assert u["Service.NoNewPrivileges"] == ["yes"]
    assert u["Service.StateDirectory"][0].startswith("groupsec")
    assert u["Service.StateDirectoryMode"] == ["0700"]
    assert u["Service.UMask"] == ["0077"]
    assert u["Service.ProtectHome"] == ["yes"]
    assert u["Service.PrivateTmp"] == ["yes"]
    caps = set(u["Service.CapabilityBoundingSet"][-1].split())
    ambient = set(u["Service.AmbientCapabilities"][-1].split())
    if "kernel" in path.name:
        assert caps == ambient == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    else:
        assert caps == ambient == set(), "only a kernel data path agent may hold capabilities"
        assert u["Service.PrivateDevices"] == ["yes"]
    families = set(u["Service.RestrictAddressFamilies"][-1].split())
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    # verify insists that ExecStart names an existing executable: point it at one
    true = shutil.which("true") or "/bin/true"
    for path in UNITS:
        name = path.name.replace("@.service", "@example.service")
        text = re.sub(r"ExecStart=\S+", f"ExecStart={true}", path.read_text())
        (tmp_path / name).write_text(text)
        res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        assert "Unknown key" not in res.stderr, res.stderr
        assert "Unknown lvalue" not in res.stderr, res.stderr
        sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        if sec.returncode != 0 and "offline" in sec.stderr:
            continue  # systemd older than 250
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout + sec.stderr)
        assert m, sec.stdout + sec.stderr
        limit = 2.5 if "kernel" in name else 2.0
        assert float(m.group(1)) <= limit, f"{name}: exposure {m.group(1)} above {limit}"


def test_three_example_uses() -> None:
    assert {p.name for p in EXAMPLES} == {"video-stream", "iot-fleet", "rollover-ops"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_controller_configs_load(example: Path) -> None:
    from groupsec.controller import config

    cfg = config.load_config(example / "groupsec.toml")
    assert cfg.levels
    policies = [lv.policy for lv in cfg.levels.values()]
    if example.name == "video-stream":
        (lv,) = cfg.levels.values()
        assert lv.datapath == "xfrm"
        assert policies[0].suite.startswith("aes-gcm")
        assert policies[0].udp_encap_port is None  # raw ESP in the kernel
    if example.name == "iot-fleet":
        assert policies[0].source_auth == "sign"
        assert policies[0].udp_encap_port == 4500
    if example.name == "rollover-ops":
        assert {p.tek_lifetime for p in policies} >= {120.0, 300.0}


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*/agent-*.toml")), ids=lambda p: p.parent.name + "/" + p.name)
def test_example_agent_configs_load(path: Path) -> None:
    from agent import config as agent_config

    cfg = agent_config.load(path)
    assert cfg.groups
    kernel = cfg.datapath == "xfrm" or cfg.wire == "raw"
    header = path.read_text().split("\n\n")[0]
    if "Unit:" in header:  # the unit named in the header must grant what the data path needs
        assert ("groupsec-agent-kernel@" in header) == kernel, header


def _exec_argv(path: Path) -> list[str]:
    (line,) = _unit(path)["Service.ExecStart"]
    return line.replace("%i", "example").split()[1:]


def test_unit_command_lines_parse_with_the_real_clis() -> None:
    from agent import cli as agent_cli
    from groupsec.cli import build_parser

    args = build_parser().parse_args(_exec_argv(DEPLOY / "systemd" / "groupsec-controller.service"))
    assert (args.command, args.dir) == ("serve", "/var/lib/groupsec")
    aparser = agent_cli.build_parser()
    for name in ("groupsec-agent@.service", "groupsec-agent-kernel@.service"):
        a = aparser.parse_args(_exec_argv(DEPLOY / "systemd" / name))
        assert a.config == "/etc/groupsec/agent/example.toml"
        assert a.state_dir == "/run/groupsec-agent/example"
