"""What the browser tests share: joining through the page, waiting for screens, hearing a slot
with a WebAudio AnalyserNode, counting the relay's packets per source, tab-title checks."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

WEB = Path(__file__).resolve().parents[2] / "web"
CATALOGS = {code: json.loads((WEB / "i18n" / f"{code}.json").read_text(encoding="utf-8")) for code in ("id", "en")}

# Keeps every RTCPeerConnection the page makes in window.__pcs (to play a modified browser),
# counts getUserMedia calls in window.__gum and `sync` commands sent in window.__syncs, and
# notes the time of the #join click in window.__joinClick.
INSTRUMENT = """
(() => {
  window.__pcs = [];
  const Orig = window.RTCPeerConnection;
  if (Orig) {
    const Wrapped = function (...args) { const pc = new Orig(...args); window.__pcs.push(pc); return pc; };
    Wrapped.prototype = Orig.prototype;
    Object.setPrototypeOf(Wrapped, Orig);
    window.RTCPeerConnection = Wrapped;
  }
  addEventListener('click', (ev) => {
    if (ev.target && ev.target.id === 'join') window.__joinClick = performance.now();
  }, true);
  window.__syncs = 0;
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    const bytes = new Uint8Array(data instanceof ArrayBuffer ? data : data.buffer ?? []);
    // msgpack: fixstr "type" then fixstr "sync"
    if (String.fromCharCode(...bytes).includes('\xa4type\xa4sync')) window.__syncs += 1;
    return send.call(this, data);
  };
  window.__gum = 0;
  const md = navigator.mediaDevices;
  if (md && md.getUserMedia) {
    const gum = md.getUserMedia.bind(md);
    md.getUserMedia = (...args) => { window.__gum += 1; return gum(...args); };
  }
})();
"""

# Keeps every WebSocket the page opens in window.__sockets, and the values #connection-status's
# data-media takes (DESIGN §7 media recovery: connecting, connected, reconnecting, idle), in order,
# in window.__media: a state that lasts less than a poll is still seen.
WATCH_MEDIA = """
(() => {
  window.__sockets = [];
  const WS = window.WebSocket;
  window.WebSocket = class extends WS {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
  window.__media = [];
  const watch = () => {
    const el = document.querySelector('#connection-status');
    new MutationObserver(() => {
      const value = el.dataset.media;
      if (value && window.__media[window.__media.length - 1] !== value) window.__media.push(value);
    }).observe(el, { attributes: true, attributeFilter: ['data-media'] });
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', watch);
  else watch();
})();
"""

# Resolves once the slot carrying `memberId` plays sound above `threshold` (RMS of the time-domain
# signal), or when `timeoutMs` runs out; returns {rms, ms} (ms null if never above).
HEAR = """
async ({ memberId, threshold, timeoutMs }) => {
  const start = performance.now();
  const ctx = (window.__lkCtx ??= new AudioContext());
  await ctx.resume().catch(() => {});
  let stream = null, analyser = null, buf = null, best = 0;
  while (performance.now() - start < timeoutMs) {
    const cur = document.querySelector(`audio[data-slot][data-member-id="${CSS.escape(memberId)}"]`);
    if (cur && cur.srcObject && cur.srcObject !== stream) {
      stream = cur.srcObject;
      analyser = ctx.createAnalyser();
      analyser.fftSize = 2048;
      ctx.createMediaStreamSource(cur.srcObject).connect(analyser);
      buf = new Float32Array(analyser.fftSize);
    }
    if (analyser) {
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const x of buf) sum += x * x;
      const rms = Math.sqrt(sum / buf.length);
      best = Math.max(best, rms);
      if (rms > threshold) return { rms, ms: performance.now() - start };
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return { rms: best, ms: null };
}
"""
HEARD_THRESHOLD = 0.01

# After a #join click (recorded by INSTRUMENT): ms from the click to the welcome's room screen,
# to the holder's slot being assigned, to its first RTP packets, and to its tone being heard.
JOIN_MILESTONES = """
async ({ memberId, threshold, timeoutMs }) => {
  const t0 = window.__joinClick;
  const out = { room: null, slot: null, packets: null, tone: null };
  const ctx = (window.__lkCtx ??= new AudioContext());
  await ctx.resume().catch(() => {});
  let analyser = null, buf = null;
  while (performance.now() - t0 < timeoutMs && out.tone === null) {
    const now = () => performance.now() - t0;
    if (out.room === null && document.body.dataset.screen === 'room') out.room = now();
    const el = document.querySelector(`audio[data-slot][data-member-id="${CSS.escape(memberId)}"]`);
    if (el && out.slot === null) out.slot = now();
    if (el && out.packets === null) {
      const track = el.srcObject && el.srcObject.getAudioTracks()[0];
      for (const pc of window.__pcs) for (const r of pc.getReceivers()) {
        if (r.track !== track) continue;
        const stats = await r.getStats();
        stats.forEach((st) => { if (st.type === 'inbound-rtp' && st.packetsReceived > 0 && out.packets === null) out.packets = now(); });
      }
    }
    if (el && el.srcObject && !analyser) {
      analyser = ctx.createAnalyser();
      analyser.fftSize = 2048;
      ctx.createMediaStreamSource(el.srcObject).connect(analyser);
      buf = new Float32Array(analyser.fftSize);
    }
    if (analyser) {
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const x of buf) sum += x * x;
      if (Math.sqrt(sum / buf.length) > threshold) out.tone = now();
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  return out;
}
"""


async def hear(page: Page, member_id: str, timeout_ms: int = 15_000) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        HEAR, {"memberId": member_id, "threshold": HEARD_THRESHOLD, "timeoutMs": timeout_ms})
    return result


async def join_milestones(page: Page, member_id: str, timeout_ms: int = 15_000) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        JOIN_MILESTONES, {"memberId": member_id, "threshold": HEARD_THRESHOLD, "timeoutMs": timeout_ms})
    return result


async def slow_link(page: Page, *, kbps: int = 400, latency_ms: int = 400, cpu: float = 6.0) -> None:
    """A slow phone on a slow mobile link, through the DevTools protocol (defaults: Chrome's slow-3G
    figures, 400 kbit/s each way and 400 ms latency, and a CPU 6× slower). Call before goto()."""
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Network.enable")
    rate = kbps * 1000 / 8
    await cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": latency_ms, "downloadThroughput": rate, "uploadThroughput": rate,
    })
    await cdp.send("Emulation.setCPUThrottlingRate", {"rate": cpu})


async def fill_join(page: Page, link: str, name: str, *, listen_only: bool = False) -> None:
    """Open an invite link and fill the join form (without pressing #join)."""
    await page.goto(link)
    await page.fill("input[name=pseudonym]", name)
    if listen_only:
        await page.check("input[name=listen_only]")
    await page.check("input[name=pledge]")


async def screen(page: Page, name: str) -> None:
    await page.wait_for_selector(f"body[data-screen={name}] #screen-{name}:not([hidden])")


async def my_id(page: Page) -> str:
    el = page.locator("#roster [data-member-id][data-me=true]")
    await expect(el).to_have_count(1)
    value = await el.get_attribute("data-member-id")
    assert value
    return value


async def neutral_title(page: Page, circle_title: str) -> None:
    title = await page.title()
    assert circle_title.lower() not in title.lower(), f"tab title {title!r} names the circle"
    assert title in (CATALOGS["id"]["app.neutral_title"], CATALOGS["en"]["app.neutral_title"], "Lingkar"), title


async def shot(page: Page, folder: Path, name: str, *, top: bool = False) -> None:
    """The screen as a 360×640 phone shows it (`top`: scrolled to the top first), and the whole
    page as `<name>-full.png`."""
    if top:
        await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(folder / f"{name}.png"))
    await page.screenshot(path=str(folder / f"{name}-full.png"), full_page=True)


@dataclass
class SourceCounts:
    """Packets of each source member the relay forwarded (slots reached) or dropped at the gate."""

    forwarded: collections.Counter[str] = field(default_factory=collections.Counter)
    gated: collections.Counter[str] = field(default_factory=collections.Counter)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def counted(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 15.0,
                         what: str = "condition") -> None:
        """Await `condition`, checked again on every packet the relay counts."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


async def count_per_source(relay: Any, circle_id: str, timeout: float = 15.0) -> SourceCounts:
    """Wrap the relay's per-circle forward() (server/media/circle.py) to count per source.
    The relay has no per-source counters of its own; this reaches into its circle table."""
    await relay_settled(relay, lambda: circle_id in relay._circles, timeout, "the relay to see this circle")
    circle = relay._circles[circle_id]
    counts = SourceCounts()
    original = circle.forward

    def forward(source: str, *args: Any) -> int:
        sent: int = original(source, *args)
        if sent < 0:
            counts.gated[source] += 1
        else:
            counts.forwarded[source] += sent
        counts.counted()
        return sent

    circle.forward = forward
    return counts


async def relay_settled(relay: Any, condition: Callable[[], bool], timeout: float = 15.0,
                        what: str = "condition") -> None:
    """Await a condition on the relay's bookkeeping, through its change notifications."""
    try:
        async with asyncio.timeout(timeout):
            await relay.wait_until(condition)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
