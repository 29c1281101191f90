"""Host side of the kernel tests: boot one VM and run every kernel-marked test inside it.

Skips with a one-line reason when a tool is missing (vng, qemu, a kernel image, a static
busybox, root) or when GROUPSEC_SKIP_VM=1. On failure it shows the guest's output.
"""

from __future__ import annotations

import os

import pytest
import run_in_vm


@pytest.mark.slow
def test_kernel_tests_pass_in_vm():
    if os.environ.get("GROUPSEC_IN_VM") == "1":
        pytest.skip("already inside the VM")
    if os.environ.get("GROUPSEC_SKIP_VM") == "1":
        pytest.skip("GROUPSEC_SKIP_VM=1: the kernel VM tests were not run")
    tools, missing = run_in_vm.find_tools()
    if tools is None:
        pytest.skip("kernel VM tests need " + ", ".join(missing))
    res = run_in_vm.run()
    print(res.summary())
    if not res.ok:
        tail = res.output[-20000:]
        why = "the guest ran no kernel test" if res.returncode == 0 else res.summary()
        pytest.fail(f"{why}\n--- guest output (tail) ---\n{tail}", pytrace=False)
