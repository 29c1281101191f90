"""Boot ONE VM with a distribution kernel and run the kernel-marked tests inside it.

The container kernels we develop and test on have XFRM netlink but no esp4/ah4/GCM, so
the kernel tests need a real kernel. virtme-ng (``vng``) boots one under qemu with the
host's filesystem visible read-only (9p), which is how the project's ``.venv`` runs in
the guest. KVM is not used: on these machines qemu aborts with "failed to set MSR 0x10a",
so it is TCG (slow, but a full run stays within a few minutes).

Usage (host, as root): ``python tests/kernel/run_in_vm.py [pytest args...]``; the exit
code is the guest pytest's. ``python tests/kernel/run_in_vm.py --shell 'COMMAND'`` runs any
command in the guest instead (for example ``groupsec bench datapath --datapath xfrm``), with
the crypto modules loaded, from the repository root, with GROUPSEC_IN_VM=1. ``tests/kernel/test_vm.py`` calls :func:`run` from the normal
test run. Environment:

* ``GROUPSEC_VM_KERNEL``: the kernel image (default: the newest ``/boot/vmlinuz-*``);
* ``GROUPSEC_VM_TIMEOUT``: seconds before the VM is killed (default 720);
* ``GROUPSEC_VM_KVM=1``: try KVM instead of TCG;
* ``GROUPSEC_SKIP_VM=1``: the host test skips (for quick local runs).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUEST_MODULES = "esp4 ah4 esp6 ah6 xfrm_user xfrm4_tunnel xfrm6_tunnel xfrm_ipcomp"
DEFAULT_TIMEOUT = 720.0


@dataclass
class Tools:
    vng: str
    kernel: str
    qemu: str


@dataclass
class Result:
    returncode: int | None  # the guest pytest's exit code; None if it never reported one
    output: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)  # from the guest's junit XML

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.counts.get("tests", 0) > 0

    def summary(self) -> str:
        c = self.counts
        return (f"kernel VM: {c.get('tests', 0) - c.get('failures', 0) - c.get('errors', 0) - c.get('skipped', 0)}"
                f" passed, {c.get('failures', 0) + c.get('errors', 0)} failed, {c.get('skipped', 0)} skipped"
                f" in {self.seconds:.0f} s (guest exit {self.returncode})")


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def find_tools() -> tuple[Tools | None, list[str]]:
    """The tools the VM needs, or the list of what is missing (one phrase each)."""
    missing = []
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    if not os.access(vng, os.X_OK):
        missing.append("vng (pip install virtme-ng)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    kernel = os.environ.get("GROUPSEC_VM_KERNEL")
    if kernel is None:
        images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime)
        kernel = str(images[-1]) if images else None
    if kernel is None or not os.access(kernel, os.R_OK):
        missing.append("a kernel image /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    boxes = [shutil.which(n) for n in ("busybox-static", "busybox.static", "busybox")]
    if not any(b and _is_static_elf(b) for b in boxes):
        missing.append("a static busybox (apt-get install busybox-static)")
    if os.geteuid() != 0:
        missing.append("root (the guest runs as root through virtme-ng's host-filesystem export)")
    if missing:
        return None, missing
    assert qemu is not None
    assert kernel is not None
    return Tools(vng, kernel, qemu), []


def guest_script(outdir: str, pytest_args: list[str], command: str | None = None) -> str:
    if command is None:
        args = " ".join(_quote(a) for a in pytest_args)
        command = (f"{_quote(sys.executable)} -m pytest -p no:cacheprovider -m kernel "
                   f"--junitxml={outdir}/junit.xml -q -ra {args}")
    return (
        f"modprobe -a {GUEST_MODULES} 2>/dev/null; "
        f"cd {_quote(str(ROOT))} && export GROUPSEC_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 "
        f"PATH={_quote(str(Path(sys.executable).parent))}:$PATH && "
        f"( {command} ); rc=$?; echo $rc > {outdir}/rc; exit $rc"
    )


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def run(pytest_args: list[str] | None = None, timeout: float | None = None, stream: bool = False,
        command: str | None = None) -> Result:
    """Boot the VM, run ``pytest -m kernel`` (default: ``tests/kernel``) or ``command`` inside,
    and return the result."""
    tools, missing = find_tools()
    if tools is None:
        raise RuntimeError("cannot boot the kernel VM: missing " + ", ".join(missing))
    if timeout is None:
        timeout = float(os.environ.get("GROUPSEC_VM_TIMEOUT", DEFAULT_TIMEOUT))
    args = pytest_args if pytest_args else [str(ROOT / "tests" / "kernel")]
    with tempfile.TemporaryDirectory(prefix="groupsec-vm-") as outdir:
        cmd = [tools.vng, "--run", tools.kernel, "--user", "root", "--memory", "1G", "--cpus", "2",
               "--rwdir", outdir, "--cwd", str(ROOT)]
        if os.environ.get("GROUPSEC_VM_KVM") != "1":
            cmd.append("--disable-kvm")
        cmd += ["--", guest_script(outdir, args, command)]
        env = dict(os.environ, PATH=f"{Path(tools.vng).parent}:{os.environ.get('PATH', '')}")
        env.pop("GROUPSEC_IN_VM", None)
        start = time.monotonic()
        lines: list[str] = []
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env, start_new_session=True) as proc:
            try:
                out, _ = _communicate(proc, timeout, lines, stream)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                lines.append(f"\n[run_in_vm] the VM did not finish within {timeout:.0f} s and was killed\n")
                out = "".join(lines)
        seconds = time.monotonic() - start
        rc_file = Path(outdir, "rc")
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        counts = _junit_counts(Path(outdir, "junit.xml"))
    return Result(rc, _clean(out), seconds, counts)


def _communicate(proc: subprocess.Popen[bytes], timeout: float, lines: list[str], stream: bool) -> tuple[str, None]:
    """Collect the VM's console output (and echo it when ``stream``) until it exits or times out."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        if not select.select([fd], [], [], min(left, 1.0))[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        text = chunk.decode(errors="replace")
        lines.append(text)
        if stream:
            sys.stdout.write(text)
            sys.stdout.flush()
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return "".join(lines), None


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)


def _junit_counts(path: Path) -> dict[str, int]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    return {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}


def main(argv: list[str]) -> int:
    tools, missing = find_tools()
    if tools is None:
        print("run_in_vm: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    if argv[:1] == ["--shell"] and len(argv) == 2:
        res = run(command=argv[1], stream=True)
        return res.returncode if res.returncode is not None else 3
    res = run(argv or None, stream=True)
    print(res.summary())
    return res.returncode if res.returncode is not None else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
