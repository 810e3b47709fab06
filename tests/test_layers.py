"""The layers: which of our packages may import what (read from the source with `ast`).

    rooms      the standard library only (the pure core)
    storage    + rooms, msgpack, msgspec, redis
    signaling  + rooms, storage, msgspec, jwt
    server     anything but loadtest, testkit, tests
    testkit    anything but our own packages (the tools of tests, benches and the load test)
    loadtest   anything but server, signaling, storage, rooms, tests: it talks to a server
               over HTTP, WebSocket frames and processes only
    tests      anything; and nothing else imports tests

Every import counts: at module level and inside functions and classes, `import x` and
`from x import y`, relative ones resolved, and the dynamic ones with a literal name
(`importlib.import_module`, `__import__`, `runpy.run_module`). The few exceptions are in
EXCEPTIONS, each with its reason. A failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = frozenset({"rooms", "storage", "signaling", "server", "loadtest", "testkit", "tests"})
STDLIB = frozenset(sys.stdlib_module_names)

# Packages held to a list: what they may import besides the standard library and themselves.
ONLY: dict[str, frozenset[str]] = {
    "rooms": frozenset(),
    "storage": frozenset({"rooms", "msgpack", "msgspec", "redis"}),  # msgspec: the codec's packer
    "signaling": frozenset({"rooms", "storage", "msgspec", "jwt"}),
}
# Packages held to a ban: what they must not import.
NEVER: dict[str, frozenset[str]] = {
    "server": frozenset({"loadtest", "testkit", "tests"}),
    "testkit": OURS - {"testkit"},
    "loadtest": frozenset({"server", "signaling", "storage", "rooms", "tests"}),
}
# (file, top-level package imported) -> (where it is allowed, why). Where: "anywhere";
# "function": inside a function only; "by name": only run by name (runpy) inside a function.
EXCEPTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("server/cli.py", "loadtest"): ("function", "`lingkar loadtest` loads the load test only when it runs"),
    ("server/media/bench.py", "testkit"): ("anywhere", "a bench of the relay: its paced, marked test track"),
    ("storage/bench.py", "testkit"): ("anywhere", "a bench of the stores: its throwaway redis-server"),
    ("loadtest/fanout.py", "server"): (
        "by name", "`python -m loadtest.fanout --profile` is the server process it starts: it runs "
                   "`python -m server.cli serve` by name (runpy) under cProfile; no server code is "
                   "imported into the load test"),
    ("loadtest/tracemem.py", "server"): (
        "by name", "`python -m loadtest.tracemem serve` is the server process the soak starts: "
                   "it runs `python -m server.cli serve` by name (runpy) with tracemalloc on; no "
                   "server code is imported into the load test"),
}
DYNAMIC = {("importlib", "import_module"), ("runpy", "run_module"), (None, "import_module"), (None, "run_module"),
           (None, "__import__")}


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the absolute dotted name imported
    statement: str  # as written
    in_function: bool
    by_name: bool = False  # importlib.import_module("…"), runpy.run_module("…"), __import__("…")

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _resolve(node: ast.ImportFrom, package: str) -> list[str]:
    """The absolute module names of a `from … import …` in a module of `package`."""
    if node.level == 0:
        return [node.module or ""]
    parts = package.split(".") if package else []
    base = parts[: len(parts) - (node.level - 1)] if node.level - 1 <= len(parts) else []
    if node.module:
        return [".".join([*base, node.module])]
    return [".".join([*base, alias.name]) for alias in node.names]


def _dynamic_name(node: ast.Call) -> str | None:
    """The literal module name of `importlib.import_module("x")`, `runpy.run_module("x")`,
    `__import__("x")` and the like; None for any other call."""
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        key: tuple[str | None, str] = (func.value.id, func.attr)
    elif isinstance(func, ast.Name):
        key = (None, func.id)
    else:
        return None
    if key not in DYNAMIC and (None, key[1]) not in DYNAMIC:
        return None
    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(source: str, path: str) -> list[Import]:
    """Every import in `source` (the module at `path`, relative to the repository root)."""
    parts = Path(path).with_suffix("").parts
    package = ".".join(parts[:-1])  # for a/b/c.py and a/b/__init__.py alike: a.b
    tree = ast.parse(source, path)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name, ast.unparse(node), in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend(Import(node.lineno, name, ast.unparse(node), in_function)
                         for name in _resolve(node, package))
        elif isinstance(node, ast.Call) and (name := _dynamic_name(node)) is not None:
            found.append(Import(node.lineno, name, ast.unparse(node), in_function, by_name=True))
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


def refusal(path: str, imp: Import) -> str | None:
    """Why `imp` in the module at `path` breaks the layers; None when it is allowed."""
    package, top = Path(path).parts[0], imp.top
    if top == package or top in STDLIB:
        return None
    scope = EXCEPTIONS.get((path, top), ("", ""))[0]
    if (scope == "anywhere" or (scope == "function" and imp.in_function)
            or (scope == "by name" and imp.in_function and imp.by_name)):
        return None
    where = {"function": " at module level (allowed inside a function only)",
             "by name": " (allowed only run by name inside a function)"}.get(scope, "")
    if top == "tests" and package != "tests":
        return f"only tests import tests{where}"
    if package in ONLY and top not in ONLY[package]:
        allowed = ", ".join(sorted(ONLY[package])) or "nothing else"
        return f"{package} may import the standard library and {allowed}{where}"
    if top in NEVER.get(package, ()):
        return f"{package} must not import {top}{where}"
    return None


def violations(path: str, source: str) -> list[str]:
    return [f"{path}:{imp.line}: {imp.statement}  <- {why}"
            for imp in imports_of(source, path) if (why := refusal(path, imp)) is not None]


def _modules() -> list[str]:
    return sorted(str(f.relative_to(ROOT)) for pkg in sorted(OURS)
                  for f in (ROOT / pkg).rglob("*.py") if "__pycache__" not in f.parts)


def test_every_package_keeps_to_its_layer() -> None:
    modules = _modules()
    assert {Path(m).parts[0] for m in modules} == OURS  # the walk found every package
    found = [v for m in modules for v in violations(m, (ROOT / m).read_text())]
    assert not found, "imports across the layers:\n" + "\n".join(found)


def test_the_exceptions_are_still_needed() -> None:
    """An exception nobody uses any more is a hole: take it out."""
    used = {(m, imp.top) for m in _modules() for imp in imports_of((ROOT / m).read_text(), m)}
    assert set(EXCEPTIONS) <= used, set(EXCEPTIONS) - used


# -- the walker itself: each rule catches a bad import fed to it --------------------------

BAD = [
    ("rooms/model.py", "import json\nimport msgpack\n", 2, "import msgpack"),
    ("rooms/rules.py", "def f():\n    from storage.codec import encode_state\n", 2, "from storage.codec"),
    ("rooms/rules.py", "from ..storage import codec\n", 1, "from ..storage import codec"),
    ("storage/codec.py", "import rooms\nimport jwt\n", 2, "import jwt"),
    ("storage/codec.py", "from signaling import frames\n", 1, "from signaling import frames"),
    ("signaling/frames.py", "from server.app import build_app\n", 1, "from server.app"),
    ("signaling/frames.py", "import starlette\n", 1, "import starlette"),
    ("server/app.py", "class A:\n    def f(self):\n        import loadtest.main\n", 3, "import loadtest.main"),
    ("server/app.py", "from testkit.ports import free_port\n", 1, "from testkit.ports"),
    ("server/media/relay.py", "from ...tests import live\n", 1, "from ...tests import live"),
    ("server/cli.py", "from loadtest.main import main\n", 1, "from loadtest.main"),  # module level
    ("testkit/ports.py", "from rooms.model import Role\n", 1, "from rooms.model"),
    ("testkit/opus.py", "def f():\n    import server.media.tap\n", 2, "import server.media.tap"),
    ("loadtest/soak.py", "from signaling.close import CloseCode\n", 1, "from signaling.close"),
    ("loadtest/fanout.py", "from server.gctune import tune_gc\n", 1, "from server.gctune"),
    ("loadtest/fanout.py", "import importlib\nimportlib.import_module('storage.codec')\n", 2, "import_module"),
    ("loadtest/soak.py", "import runpy\nrunpy.run_module('server.cli')\n", 2, "run_module"),  # not tracemem
    ("loadtest/tracemem.py", "import runpy\nrunpy.run_module('server.cli')\n", 2, "run_module"),  # module level
    ("loadtest/tracemem.py", "def main():\n    from server.cli import main\n", 2, "from server.cli"),
    ("loadtest/peer.py", "from tests.media.peers import ClientPeer\n", 1, "from tests.media.peers"),
]


@pytest.mark.parametrize(("path", "source", "line", "text"), BAD)
def test_the_walker_catches_a_bad_import(path: str, source: str, line: int, text: str) -> None:
    found = violations(path, source)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line}: ") and text in found[0], found


GOOD = [
    ("rooms/model.py", "from __future__ import annotations\nimport dataclasses\nfrom . import errors\n"),
    ("storage/codec.py", "import msgpack\nfrom rooms.model import Role\nfrom .store import Store\n"),
    ("signaling/session.py", "import jwt\nimport msgspec\nfrom storage.manager import RoomManager\n"),
    ("server/app.py", "import starlette\nfrom signaling import frames\nfrom .media import relay\n"),
    ("server/cli.py", "def main():\n    from loadtest.main import main\n"),
    ("server/media/bench.py", "from testkit.opus import PacedTone\nfrom ..gctune import tune_gc\n"),
    ("loadtest/soak.py", "import msgpack\nimport websockets\nfrom testkit.redis_server import RedisServer\n"),
    ("loadtest/tracemem.py", "import runpy\ndef main():\n    runpy.run_module('server.cli')\n"),
    ("testkit/opus.py", "import av\nfrom aiortc import RTCPeerConnection\nfrom .ports import free_port\n"),
    ("tests/test_x.py", "from server.app import build_app\nfrom loadtest.main import main\nfrom tests import live\n"),
]


@pytest.mark.parametrize(("path", "source"), GOOD)
def test_the_walker_lets_an_allowed_import_pass(path: str, source: str) -> None:
    assert violations(path, source) == []


def test_relative_imports_resolve_against_the_package() -> None:
    found = imports_of("from . import a\nfrom .b import c\nfrom .. import d\nfrom ..e.f import g\n",
                       "server/media/x.py")
    assert [imp.module for imp in found] == ["server.media.a", "server.media.b", "server.d", "server.e.f"]
    assert [imp.module for imp in imports_of("from . import x\n", "server/media/__init__.py")] == ["server.media.x"]
