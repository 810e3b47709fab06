"""The web client's modules parse, and its browser-free unit tests (web/tests/*.mjs) pass.
Skipped where Node.js is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.mark.parametrize("module", sorted(p.name for p in (WEB / "js").glob("*.js")))
def test_module_parses(module: str) -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--check", str(WEB / "js" / module)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_client_unit_tests_pass() -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--test", *sorted(str(p) for p in (WEB / "tests").glob("*.test.mjs"))],
        capture_output=True,
        text=True,
        check=False,
        cwd=WEB,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
