"""The signaling path compiled with mypyc, where it can be built (issue 15).

The modules every command runs through — the rules and the room model, the manager, the memory
store, the event hub and the codec, the connection machine (not the session adapter, which stays
Python: README, "Architecture") — are plain typed Python (``mypy --strict``). mypyc, which comes with mypy, compiles the very same sources to C
extensions; on 400 circles × 8 members that cuts the Python each command costs by about a
third (README, "Signaling against a bare relay"). Nothing changes in what they do: the
compiled modules are the same source, and the test suite runs on them.

The build is keyed by the sources' digest (with the Python and mypy versions), made by
``make setup`` (``python -m server.compiled``) into the virtualenv, in about a minute, and
atomically, so processes that start together never see half of one. `activate` (first thing
in ``lingkar serve`` and in the test session) puts a finder in front of the import system that
loads these modules from the build matching the sources as they are now; when there is none
(no C compiler, no Python headers, a source edited since), or with ``LINGKAR_COMPILED=off``,
nothing is put in front and the sources run as they are. A stale build is never loaded: an
edit changes the digest.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rooms", "storage", "signaling")  # what mypyc reads (the modules below import them)
MODULES = (
    "rooms.errors", "rooms.model", "rooms.events", "rooms.commands", "rooms.rules",
    "storage.codec", "storage.locks", "storage.subscription", "storage.memory_store",
    "storage.manager",
    "signaling.ratelimit", "signaling.translate", "signaling.connection",
)
MANIFEST = "modules.json"  # module name -> file, in a finished build
ENV = "LINGKAR_COMPILED"  # "off": run the sources as they are


def _source(root: Path, module: str) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def disabled() -> bool:
    """``LINGKAR_COMPILED=off`` (or 0, no, false): the sources run as Python."""
    return os.environ.get(ENV, "").lower() in ("off", "0", "no", "false")


def digest(root: Path = ROOT) -> str:
    """What a build is keyed by: every source mypyc reads, which modules it compiles, this
    Python, this mypy."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            h.update(f"{package}/{path.name}\0".encode())
            h.update(path.read_bytes())
    try:
        mypy = version("mypy")
    except PackageNotFoundError:
        mypy = "none"
    h.update(f"{sys.version}\0{sys.platform}\0{mypy}\0{' '.join(MODULES)}\0".encode())
    return h.hexdigest()[:16]


def place() -> Path:
    """Where builds are kept: ``$LINGKAR_COMPILED_DIR``, or the virtualenv (``sys.prefix``)."""
    return Path(os.environ.get("LINGKAR_COMPILED_DIR") or Path(sys.prefix) / "lingkar-compiled")


def built(root: Path = ROOT, where: Path | None = None) -> dict[str, str] | None:
    """The finished build for the sources under `root` as they are now: module -> file."""
    return _finished((where or place()) / digest(root))


def _finished(target: Path) -> dict[str, str] | None:
    """The manifest of the build in `target`, if it is there whole."""
    try:
        files: dict[str, str] = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not all(Path(f).is_file() for f in files.values()):
        return None
    return files


def build(root: Path = ROOT, where: Path | None = None) -> dict[str, str] | None:
    """Compile `MODULES` (unless a build for these sources exists): module -> file, or None
    when it cannot be built here (said in the log: the sources run as they are)."""
    where = where or place()
    key = digest(root)
    final = where / key
    files = _finished(final)
    if files is not None:
        return files
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mypyc-", dir=where) as tmp:
        work = Path(tmp) / "src"
        for package in PACKAGES:  # a copy: nothing is written next to the sources
            (work / package).mkdir(parents=True)
            for path in (root / package).glob("*.py"):
                shutil.copy2(path, work / package / path.name)
        try:
            done = subprocess.run(
                # The project's mypy settings (the stub-less imports), wherever the build is.
                [sys.executable, "-m", "mypyc", "--config-file", str(ROOT / "pyproject.toml"),
                 *(str(_source(Path(), m)) for m in MODULES)],
                cwd=work, capture_output=True, text=True, timeout=1800, check=False,
                env={**os.environ, "MYPYC_OPT_LEVEL": os.environ.get("MYPYC_OPT_LEVEL", "3")})
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("the signaling path was not compiled (%s); it runs as Python", exc)
            return None
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            log.warning("the signaling path was not compiled; it runs as Python: %s", " | ".join(tail))
            return None
        staging = Path(tmp) / key
        staging.mkdir()
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        files = {}
        for module in MODULES:
            stem = work.joinpath(*module.split("."))
            found = [p for p in stem.parent.glob(stem.name + ".*") if p.name.endswith(suffixes)]
            if len(found) != 1:
                log.warning("the signaling path was not compiled (no %s built); it runs as Python", module)
                return None
            files[module] = found[0].name
        shared = [p for p in work.glob("*__mypyc.*") if p.name.endswith(suffixes)]
        if len(shared) > 1:
            log.warning("the signaling path was not compiled (%d shared libraries); it runs as Python", len(shared))
            return None
        for p in shared:  # the modules' common library, imported by its own name
            files[p.name.split(".", 1)[0]] = p.name
        manifest = {}
        for module, name in files.items():  # laid out as the packages are
            relative = Path(*module.split(".")[:-1], name)
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / relative, staging / relative)
            manifest[module] = str(final / relative)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(staging, final)  # atomic: a build is whole or absent
        except OSError:
            if _finished(final) is None:  # not another process's build, finished first
                raise
    for old in where.iterdir():  # builds for sources as they were: nothing starts on them again
        if old.name != key and len(old.name) == len(key) and not old.name.startswith("mypyc-"):
            shutil.rmtree(old, ignore_errors=True)
    return _finished(final)


class _Finder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their files, ahead of the sources."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def activate() -> str:
    """Run the compiled modules from here on, where a build matches the sources: "compiled",
    or "python" and why not. Call it before anything imports them."""
    if disabled():
        return f"python ({ENV}=off)"
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return "compiled"
    if any(m in sys.modules for m in MODULES):
        return "python (imported before the compiled modules could be put in front)"
    files = built()
    if files is None:
        return "python (no build for these sources: `make setup` makes one)"
    sys.meta_path.insert(0, _Finder(files))
    return "compiled"


def active() -> bool:
    """Whether the rules (and the other `MODULES`) running here are the compiled ones."""
    module = sys.modules.get("rooms.rules")
    return module is not None and not str(getattr(module, "__file__", "")).endswith(".py")


def main() -> None:
    """``make setup``: build for the sources as they are (a no-op when one exists)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if disabled():
        print(f"{ENV}=off: the signaling path is not compiled")
        return
    if built() is None:
        print("compiling the signaling path with mypyc (about a minute, once per change of its sources)…", flush=True)
    files = build()
    print("signaling path: " + ("compiled" if files else "Python (see the warning above)"))


if __name__ == "__main__":
    main()
