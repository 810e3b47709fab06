"""The signaling path compiled with mypyc (server/compiled.py): the suite runs on it where it
is built, a build is only ever loaded for the sources it was made from, and
LINGKAR_COMPILED=off runs the sources as Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from server import compiled

_PROBE = ("from server import compiled; print(compiled.activate()); "
          "import rooms.rules, signaling.connection; "
          "print(rooms.rules.__file__); print(signaling.connection.__file__)")


def _can_build() -> bool:
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("cc") is not None and headers.is_file()


def _probe(**env: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=compiled.ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env}, check=True)
    return done.stdout.splitlines()


def test_the_suite_runs_the_compiled_path() -> None:
    if compiled.disabled():
        pytest.skip("LINGKAR_COMPILED=off: this run is the Python one")
    if not _can_build():
        pytest.skip("no C compiler or no Python headers here: the sources run as Python")
    assert compiled.built() is not None, "`make setup` (python -m server.compiled) builds it"
    import rooms.rules
    import signaling.connection
    import storage.manager

    assert compiled.active()
    for module in (rooms.rules, signaling.connection, storage.manager):
        assert not str(module.__file__).endswith(".py"), module.__file__


def test_a_server_process_runs_it_and_off_runs_the_sources() -> None:
    if not _can_build() or compiled.built() is None:
        pytest.skip("not built here")
    said, rules, connection = _probe(**{compiled.ENV: "on"})
    assert said == "compiled"
    assert Path(rules).suffix == ".so" and Path(connection).suffix == ".so"
    said, rules, connection = _probe(**{compiled.ENV: "off"})
    assert said == f"python ({compiled.ENV}=off)"
    assert rules == str(compiled.ROOT / "rooms" / "rules.py")
    assert connection == str(compiled.ROOT / "signaling" / "connection.py")


def test_a_build_is_only_loaded_for_the_sources_it_was_made_from(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    for package in compiled.PACKAGES:
        shutil.copytree(compiled.ROOT / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert compiled.digest(copy) == compiled.digest()  # the same sources, the same key
    rules = copy / "rooms" / "rules.py"
    rules.write_text(rules.read_text() + "\n# an edit\n")
    assert compiled.digest(copy) != compiled.digest()
    assert compiled.built(copy) is None  # no build for the edited sources: they run as Python
    edited = compiled.digest(copy)
    (copy / "storage" / "new_module.py").write_text("")  # a module added counts too
    assert compiled.digest(copy) != edited


def test_a_build_made_anywhere_loads_and_replaces_the_last(tmp_path: Path) -> None:
    """`build` as `make setup` runs it, into a place outside the project (mypy's settings are
    the project's wherever the build is made); a second call finds it and builds nothing."""
    if not _can_build():
        pytest.skip("no C compiler or no Python headers here")
    stale = tmp_path / ("0" * len(compiled.digest()))  # a build for sources as they were
    stale.mkdir()
    files = compiled.build(where=tmp_path)
    assert files is not None and set(compiled.MODULES) <= set(files)
    assert all(Path(f).is_relative_to(tmp_path / compiled.digest()) for f in files.values())
    assert compiled.build(where=tmp_path) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == [compiled.digest()]
    said, rules, _ = _probe(**{compiled.ENV: "on", "LINGKAR_COMPILED_DIR": str(tmp_path)})
    assert said == "compiled" and Path(rules).is_relative_to(tmp_path)
