"""How long the join page takes to become ready on a slow phone: a measurement, not a test
(DESIGN §9: timings are reported, never asserted).

Each run opens a member invite link in a fresh browser context (empty cache) in Debian's headless
Chromium, with the network emulated through the DevTools protocol (Chrome's slow-3G figures by
default: 400 kbit/s down and up, 400 ms latency) and the CPU slowed 6×, and reports the time from
the start of the navigation to the moment the join form works ("ready": button#join is enabled
and labelled — the same test for the old page, which had no loading state, and the new one, which
also sets body[data-ready=true] at that moment), with the requests started before it
(`--timeline` lists them with their start and end).

    .venv/bin/python -m tests.e2e.measure_join_load --runs 3
    .venv/bin/python -m tests.e2e.measure_join_load --runs 3 --web /tmp/web-before

`--web` serves another copy of web/ (for a before/after comparison, e.g. `git archive HEAD web |
tar -x -C /tmp/before` and a symlink to web/node_modules). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from playwright.async_api import async_playwright

import server.app
from tests import live
from tests.e2e.conftest import ARGS, CHROMIUM, PHONE
from tests.e2e.helpers import slow_link

# Records performance.now() (ms since the navigation started) when the join form first works.
READY_WATCH = """
(() => {
  const ready = () => {
    const b = document.querySelector('button#join');
    return !!b && !b.disabled && b.textContent.trim() !== '' && !b.closest('[aria-busy=true]');
  };
  const check = () => {
    if (window.__readyAt === undefined && ready()) window.__readyAt = performance.now();
  };
  new MutationObserver(check).observe(document, {
    subtree: true, childList: true, attributes: true, characterData: true,
  });
})();
"""

# The navigation's own timings and every request started before "ready": [path, start, end] (ms).
TIMELINE = """
() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const ready = window.__readyAt;
  const before = performance.getEntriesByType('resource').filter((e) => e.startTime < ready)
    .map((e) => [new URL(e.name).pathname, Math.round(e.startTime), Math.round(e.responseEnd)]);
  return { ready, html: nav.responseEnd, dcl: nav.domContentLoadedEventEnd,
           before: [[location.pathname, 0, Math.round(nav.responseEnd)], ...before] };
}
"""


async def one_run(browser: Any, link: str, *, kbps: int, latency_ms: int, cpu: float) -> dict[str, Any]:
    ctx = await browser.new_context(viewport=PHONE)
    try:
        page = await ctx.new_page()
        await page.add_init_script(READY_WATCH)
        await slow_link(page, kbps=kbps, latency_ms=latency_ms, cpu=cpu)
        await page.goto(link, wait_until="commit", timeout=60_000)
        await page.wait_for_function("() => window.__readyAt !== undefined", timeout=60_000, polling=100)
        timing = await page.evaluate(TIMELINE)
        return {"ready_ms": round(timing["ready"]), "html_ms": round(timing["html"]),
                "dom_content_loaded_ms": round(timing["dcl"]),
                "requests_before_ready": len(timing["before"]), "timeline": timing["before"]}
    finally:
        await ctx.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kbps", type=int, default=400)
    parser.add_argument("--latency", type=int, default=400, help="ms")
    parser.add_argument("--cpu", type=float, default=6.0, help="CPU slowdown factor")
    parser.add_argument("--language", choices=["id", "en"], default="id")
    parser.add_argument("--web", type=Path, help="serve this copy of web/ instead of the repository's")
    parser.add_argument("--timeline", action="store_true", help="list each run's requests before ready")
    parser.add_argument("--json", action="store_true", help="print every run as JSON")
    args = parser.parse_args()
    if args.web:
        server.app.WEB_DIR = args.web.resolve()

    async with live.live_server() as srv, async_playwright() as pw:
        circle = await srv.create_circle(title="Ukur", language=args.language)
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            runs = []
            for i in range(args.runs):
                r = await one_run(browser, circle["links"]["member"],
                                  kbps=args.kbps, latency_ms=args.latency, cpu=args.cpu)
                runs.append(r)
                print(f"run {i + 1}: ready {r['ready_ms']} ms (html {r['html_ms']} ms, "
                      f"DOMContentLoaded {r['dom_content_loaded_ms']} ms, "
                      f"{r['requests_before_ready']} requests before ready)")
                if args.timeline:
                    for path, start, end in r["timeline"]:
                        print(f"    {start:5d} → {end:5d} ms  {path}")
        finally:
            await browser.close()
    print(f"{args.kbps} kbit/s, {args.latency} ms latency, CPU /{args.cpu:g}, web={args.web or 'web/'}: "
          f"ready median {statistics.median(r['ready_ms'] for r in runs):.0f} ms "
          f"(min {min(r['ready_ms'] for r in runs)}, max {max(r['ready_ms'] for r in runs)})")
    if args.json:
        print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
