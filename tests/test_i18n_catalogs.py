"""F15: the two catalogs of the web client have the same keys, and every key the pages and
scripts use exists in both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
CATALOGS = ("id", "en")

DATA_I18N = re.compile(r'data-i18n(?:-placeholder|-aria-label|-title)?="([^"]+)"')
T_CALL = re.compile(r"""\bt\(\s*['"]([^'"]+)['"]""")
# Keys passed around as data before reaching t(): ERROR_KEYS maps, effects {announce: '…'}.
KEY_LITERAL = re.compile(
    r"""['"]((?:announce|notice|error|ended|prompt|floor|timer|roster|room|mod|org|join|note|help|conn|confirm|mode|lobby|common|nav)\.[a-z0-9_]+)['"]"""
)


def load(code: str) -> dict[str, str]:
    data = json.loads((WEB / "i18n" / f"{code}.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def html_keys() -> dict[str, set[str]]:
    return {p.name: set(DATA_I18N.findall(p.read_text(encoding="utf-8"))) for p in WEB.glob("*.html")}


def js_keys() -> dict[str, set[str]]:
    found = {}
    for p in (WEB / "js").glob("*.js"):
        text = p.read_text(encoding="utf-8")
        found[p.name] = set(T_CALL.findall(text)) | set(KEY_LITERAL.findall(text))
    return found


def test_catalogs_have_identical_keys() -> None:
    ids, ens = load("id"), load("en")
    assert sorted(set(ids) - set(ens)) == [], "keys missing in en.json"
    assert sorted(set(ens) - set(ids)) == [], "keys missing in id.json"


@pytest.mark.parametrize("code", CATALOGS)
def test_catalog_values_are_non_empty_strings(code: str) -> None:
    bad = [k for k, v in load(code).items() if not isinstance(v, str) or not v.strip()]
    assert bad == []


@pytest.mark.parametrize("code", CATALOGS)
def test_placeholders_match_between_languages(code: str) -> None:
    other = load("en" if code == "id" else "id")
    mine = load(code)
    placeholder = re.compile(r"\{(\w+)\}")
    bad = [k for k in mine if set(placeholder.findall(mine[k])) != set(placeholder.findall(other.get(k, "")))]
    assert bad == []


@pytest.mark.parametrize("code", CATALOGS)
def test_every_data_i18n_key_in_the_pages_exists(code: str) -> None:
    catalog = load(code)
    missing = {page: sorted(keys - set(catalog)) for page, keys in html_keys().items() if keys - set(catalog)}
    assert missing == {}


@pytest.mark.parametrize("code", CATALOGS)
def test_every_key_the_scripts_use_exists(code: str) -> None:
    catalog = load(code)
    missing = {js: sorted(keys - set(catalog)) for js, keys in js_keys().items() if keys - set(catalog)}
    assert missing == {}


def test_the_pages_and_scripts_use_keys_at_all() -> None:
    # Guards the regexes above: a parser that finds nothing would pass every test vacuously.
    assert len(set().union(*html_keys().values())) > 50
    assert len(set().union(*js_keys().values())) > 50
