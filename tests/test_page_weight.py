"""What the room page loads before any media must stay small on a cheap phone on a mobile
network: circle.html, its stylesheet, every module it imports transitively (static and dynamic
imports, so the moderator's module counts too; the msgpack codec included), the icon and the i18n
catalog of the circle's language — at most 150 KB uncompressed, for an Indonesian and for an
English circle. The codec is the package's minified build (web/js/msgpack.js says how an ES module
takes it in): its unminified ES modules alone were 56 KB of the budget.

The join form waits for less: the page, its stylesheet, circle.js and what it imports statically,
the icon and the catalog — at most 56 KB. Those modules are all preloaded by circle.html (one round
trip, not one per level of imports); the room's modules (room.js and everything it imports, the
msgpack codec included) are preloaded by circle.js once the form works, from a list checked here
against the module graph. tests/e2e/measure_join_load.py measures the time to a working join form
on an emulated slow link (reported, never asserted).

The page fetches one catalog only: the invite token's `lng` hint picks it before the join screen
(web/js/circle.js), and the other is fetched only when the member switches language. The browser
test tests/e2e/test_join_leave_language.py checks that an English circle fetches en.json alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
BUDGET_BYTES = 150 * 1024
JOIN_BUDGET_BYTES = 56 * 1024

# src="…" / href="…" of scripts, stylesheets, icons and module preloads in the HTML.
HTML_REF = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
# import … from '…';  import '…';  export … from '…';  import('…')
JS_IMPORT = re.compile(
    r"""(?:^|[;\s])(?:import|export)\s+(?:[^'"`;]*?\s+from\s+)?["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']\s*\)""",
    re.M,
)
SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.M)


def to_file(url: str) -> Path:
    """Map a URL the server serves to the file in web/ (see server/pages.py)."""
    if url.startswith("/static/"):
        return WEB / url.removeprefix("/static/")
    if url.startswith("/vendor/"):
        return WEB / "node_modules" / url.removeprefix("/vendor/")
    raise AssertionError(f"unexpected URL {url!r}")


def resolve(url: str, base: str) -> str:
    if url.startswith("/"):
        return url
    parts = base.rsplit("/", 1)[0].split("/")
    for piece in url.split("/"):
        if piece == "..":
            parts.pop()
        elif piece not in ("", "."):
            parts.append(piece)
    return "/".join(parts)


def module_graph(entry_urls: list[str], *, dynamic: bool = True) -> set[str]:
    """Every URL reachable from `entry_urls` through imports (static ones only unless `dynamic`)."""
    seen: set[str] = set()
    todo = list(entry_urls)
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        path = to_file(url)
        assert path.is_file(), f"{url} -> {path} is missing (run `npm install` in web/)"
        if path.suffix in (".js", ".mjs"):
            text = SOURCE_MAP.sub("", path.read_text(encoding="utf-8"))
            for a, b in JS_IMPORT.findall(text):
                if a or dynamic:
                    todo.append(resolve(a or b, url))
    return seen


def room_page_files(language: str = "id") -> set[Path]:
    html = WEB / "circle.html"
    refs = HTML_REF.findall(html.read_text(encoding="utf-8"))
    urls = module_graph([r for r in refs if r.startswith(("/static/", "/vendor/"))])
    files = {to_file(u) for u in urls} | {html, WEB / "icon.svg"}
    files.add(WEB / "i18n" / f"{language}.json")
    return files


# <link rel="modulepreload" href="…"> in the HTML.
PRELOAD = re.compile(r"""<link\b[^>]*\brel=["']modulepreload["'][^>]*\bhref=["']([^"']+)["']""", re.I)
# In circle.js: const NAME = [ ...['a', 'b'].map((f) => `/prefix/${f}.js`), … ];
JS_LIST = r"const {name} = \[(.*?)\];"
MAPPED = re.compile(r"\[([^\]]*)\]\.map\(\(f\) => `([^`]*)`\)", re.S)
QUOTED = re.compile(r"""['"]([^'"]+)['"]""")


def preloaded_by_circle_js(name: str) -> set[str]:
    """The URLs of one of circle.js's preload lists (quoted URLs, or names mapped into a template)."""
    text = (WEB / "js" / "circle.js").read_text(encoding="utf-8")
    found = re.search(JS_LIST.format(name=name), text, re.S)
    assert found, f"{name} is not in circle.js"
    body = found.group(1)
    urls = {template.replace("${f}", n) for names, template in MAPPED.findall(body)
            for n in QUOTED.findall(names)}
    urls |= {u for u in QUOTED.findall(MAPPED.sub("", body)) if u.startswith("/")}
    return urls


def circle_html() -> str:
    return (WEB / "circle.html").read_text(encoding="utf-8")


def join_form_urls() -> set[str]:
    """What the join form waits for: circle.js and its static imports (dynamic ones come later)."""
    return module_graph(["/static/js/circle.js"], dynamic=False)


def test_the_page_picks_its_catalog_from_the_token_hint() -> None:
    circle = (WEB / "js" / "circle.js").read_text(encoding="utf-8")
    assert "tokenHints(token)" in circle and "claims.lng" in circle


def test_circle_html_preloads_every_module_the_join_form_waits_for() -> None:
    preloaded = set(PRELOAD.findall(circle_html()))
    missing = join_form_urls() - preloaded - {"/static/js/circle.js"}
    assert not missing, f"not preloaded by circle.html: {sorted(missing)}"
    # Only those: a preload of a room module would share the slow link with the join form's files.
    extra = preloaded - join_form_urls()
    assert not extra, f"preloaded by circle.html but not needed by the join form: {sorted(extra)}"


def test_circle_js_preloads_the_rooms_whole_module_graph() -> None:
    room = module_graph(["/static/js/room.js"], dynamic=False)
    listed = preloaded_by_circle_js("ROOM_MODULES")
    assert listed == room - join_form_urls(), (
        f"ROOM_MODULES misses {sorted(room - join_form_urls() - listed)}, "
        f"lists what room.js does not import: {sorted(listed - room)}")
    moderator = module_graph(["/static/js/ui-mod.js"], dynamic=False) - room - join_form_urls()
    assert preloaded_by_circle_js("MODERATOR_MODULES") == moderator


def test_the_join_form_waits_for_at_most_56_kb() -> None:
    files = {to_file(u) for u in join_form_urls()} | {WEB / "circle.html", WEB / "css" / "lingkar.css",
                                                       WEB / "icon.svg", WEB / "i18n" / "id.json"}
    total = sum(p.stat().st_size for p in files)
    detail = "\n".join(f"{p.stat().st_size:7d} {p.relative_to(WEB)}" for p in sorted(files))
    assert total <= JOIN_BUDGET_BYTES, f"{total} bytes > {JOIN_BUDGET_BYTES}:\n{detail}"


def test_room_page_imports_the_whole_client() -> None:
    names = {p.name for p in room_page_files()}
    for expected in (
        "circle.js",
        "room.js",
        "ui-join.js",
        "protocol.js",
        "state.js",
        "media.js",
        "leave.js",
        "i18n.js",
        "ui-mod.js",
        "msgpack.js",
        "msgpack.min.js",
        "lingkar.css",
    ):
        assert expected in names


@pytest.mark.parametrize("language", ["id", "en"])
def test_room_page_loads_at_most_150_kb_before_media(language: str) -> None:
    files = room_page_files(language)
    total = sum(p.stat().st_size for p in files)
    detail = "\n".join(f"{p.stat().st_size:7d} {p.relative_to(WEB)}" for p in sorted(files))
    assert total <= BUDGET_BYTES, f"{total} bytes > {BUDGET_BYTES}:\n{detail}"
