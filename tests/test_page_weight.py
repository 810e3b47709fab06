"""What the room page loads before any media must stay small on a cheap phone on a mobile
network: circle.html, its stylesheet, every module it imports transitively (static and dynamic
imports, so the moderator's module counts too; the msgpack codec included), the icon and the i18n
catalog of the circle's language — at most 150 KB uncompressed, for an Indonesian and for an
English circle.

The page fetches one catalog only: the invite token's `lng` hint picks it before the join screen
(web/js/circle.js), and the other is fetched only when the member switches language. The browser
test tests/e2e/test_join_leave_language.py checks that an English circle fetches en.json alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
BUDGET_BYTES = 150 * 1024

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


def module_graph(entry_urls: list[str]) -> set[str]:
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
                todo.append(resolve(a or b, url))
    return seen


def room_page_files(language: str = "id") -> set[Path]:
    html = WEB / "circle.html"
    refs = HTML_REF.findall(html.read_text(encoding="utf-8"))
    urls = module_graph([r for r in refs if r.startswith(("/static/", "/vendor/"))])
    files = {to_file(u) for u in urls} | {html, WEB / "icon.svg"}
    files.add(WEB / "i18n" / f"{language}.json")
    return files


def test_the_page_picks_its_catalog_from_the_token_hint() -> None:
    circle = (WEB / "js" / "circle.js").read_text(encoding="utf-8")
    assert "languageHint(token)" in circle and "claims.lng" in circle


def test_room_page_imports_the_whole_client() -> None:
    names = {p.name for p in room_page_files()}
    for expected in (
        "circle.js",
        "protocol.js",
        "state.js",
        "media.js",
        "leave.js",
        "i18n.js",
        "ui-mod.js",
        "Encoder.mjs",
        "Decoder.mjs",
        "lingkar.css",
    ):
        assert expected in names


@pytest.mark.parametrize("language", ["id", "en"])
def test_room_page_loads_at_most_150_kb_before_media(language: str) -> None:
    files = room_page_files(language)
    total = sum(p.stat().st_size for p in files)
    detail = "\n".join(f"{p.stat().st_size:7d} {p.relative_to(WEB)}" for p in sorted(files))
    assert total <= BUDGET_BYTES, f"{total} bytes > {BUDGET_BYTES}:\n{detail}"
