// The WebSocket session (DESIGN §5): binary msgpack frames, refs, reconnect with resume,
// redirect.
//
// Versions and `sync`: a version gap is NOT a reason to sync. Events are filtered by audience
// (moderator-only and one-member events bump the room version too), so a member sees gaps all
// the time; syncing on each would cost the server a snapshot per gap for nothing. The server
// delivers every event meant for us, in order and without loss, on each connection, and sends a
// `snapshot` itself when it cannot replay. So: events at or below the version of the snapshot we
// hold are ignored (already in it), everything else is applied. After a reconnect the resume's
// `welcome` carries a fresh snapshot (that is the sync after a resume), and `requestSync()`
// stays for the app to call when it has reason to doubt its state.
import { Encoder, Decoder } from './msgpack.js';
import { versionStep } from './state.js';

export const CLOSE = Object.freeze({
  NORMAL: 1000, TOO_BIG: 1009, TRY_LATER: 1013,
  ENDED: 4000, LEFT: 4001, REDIRECT: 4300, BAD_FRAME: 4400, BAD_TOKEN: 4401,
  FORBIDDEN: 4403, NO_CIRCLE: 4404, HELLO_TIMEOUT: 4408, FULL: 4409, RATE: 4429,
});

// Closes after which trying again cannot help: the session is over.
const FINAL = new Set([CLOSE.ENDED, CLOSE.LEFT, CLOSE.FORBIDDEN, CLOSE.NO_CIRCLE, CLOSE.FULL]);
const ACK_TIMEOUT_MS = 10000;
const MAX_BACKOFF_MS = 10000;
// Undefined fields are left out: the server refuses unknown or wrongly typed fields.
const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder();

// `?c=` names the circle, so that a proxy in front of several processes sends the socket to
// the circle's home at once (DESIGN §8); a `redirect` stays the fallback.
export function wsUrl(path = '/ws', circle = null) {
  const query = circle ? `?c=${encodeURIComponent(circle)}` : '';
  return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}${path}${query}`;
}

/**
 * Session callbacks:
 *   onJoined(kind, frame)   kind: 'welcome' | 'lobby' | 'admitted' | 'snapshot'
 *   onEvent(name, data, version)
 *   onFrame(frame)          anything else the app wants (answer, media, error without ref)
 *   onStatus(status, info)  'connecting' | 'open' | 'reconnecting' | 'closed'
 *   getVersion()            the version of the state the app holds (or null)
 */
export class Session {
  constructor({ hello, url = wsUrl(), callbacks, storage = null }) {
    this.hello = { ...hello };        // {token, name, listen_only}
    this.url = url;
    this.entryUrl = url;              // a redirect is followed once; reconnects start here again
    this.cb = callbacks;
    this.storage = storage;           // {save(resume), load(), clear()}
    this.resume = storage?.load() ?? null;
    this.ws = null;
    this.ref = 0;
    this.pending = new Map();
    this.attempt = 0;
    this.timer = null;
    this.closedByUs = false;
    this.syncing = false;
    this.lastWasEvent = false;        // several events of one command share a version
    this.onOnline = () => { if (this.timer) { clearTimeout(this.timer); this.timer = null; this.open(); } };
    addEventListener('online', this.onOnline);
  }

  get resuming() { return this.resume !== null; }

  open() {
    this.cb.onStatus(this.attempt ? 'reconnecting' : 'connecting');
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.usedResume = this.resume !== null;
    ws.onopen = () => {
      const hello = { type: 'hello', ...this.hello };
      if (this.resume) hello.resume = this.resume;
      this.rawSend(hello);
    };
    ws.onmessage = (msg) => this.receive(msg.data);
    ws.onclose = (ev) => this.closed(ws, ev.code);
  }

  rawSend(frame) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(encoder.encode(frame));   // a copy, not a view of a shared buffer
    return true;
  }

  /**
   * The network path went away (media.js: onPathLost): this socket went out the same way, and a
   * browser keeps a socket whose local address is gone OPEN for minutes. Leave it (no closing
   * handshake to wait for) and resume on a new one now. A socket still connecting is left alone;
   * one waiting to reconnect goes now.
   */
  reconnectNow() {
    if (this.closedByUs) return;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; this.open(); return; }
    const old = this.ws;
    if (!old || old.readyState !== WebSocket.OPEN) return;
    old.onopen = old.onmessage = old.onclose = null;
    try { old.close(); } catch { /* already closing */ }
    this.closed(old, 1006, 0);
  }

  /** Send a command; resolves with the ack, rejects with {code, message}. */
  send(type, fields = {}) {
    const ref = ++this.ref;
    return new Promise((resolve, reject) => {
      if (!this.rawSend({ type, ...fields, ref })) {
        reject({ code: 'offline', message: 'not connected' });
        return;
      }
      const timeout = setTimeout(() => {
        this.pending.delete(ref);
        reject({ code: 'timeout', message: 'no answer' });
      }, ACK_TIMEOUT_MS);
      this.pending.set(ref, { resolve, reject, timeout });
    });
  }

  receive(data) {
    if (!(data instanceof ArrayBuffer)) return;
    let frame;
    try { frame = decoder.decode(new Uint8Array(data)); } catch { return; }
    if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
    // Any answer that echoes one of our refs settles that command (ack, error, answer, snapshot).
    const waiting = typeof frame.ref === 'number' ? this.pending.get(frame.ref) : undefined;
    if (waiting) {
      this.pending.delete(frame.ref);
      clearTimeout(waiting.timeout);
      if (frame.type === 'error') waiting.reject(frame);
      else waiting.resolve(frame);
      if (frame.type === 'ack' || frame.type === 'error') return;
    }
    switch (frame.type) {
      case 'welcome':
      case 'lobby':
        this.attempt = 0;
        this.keepResume(frame.resume);
        this.syncing = false;
        this.lastWasEvent = false;
        this.cb.onJoined(frame.type, frame);
        this.cb.onStatus('open');
        return;
      case 'admitted':
      case 'snapshot':
        this.syncing = false;
        this.lastWasEvent = false;
        this.cb.onJoined(frame.type, frame);
        return;
      case 'event':
        this.event(frame);
        return;
      case 'redirect':
        if (typeof frame.url === 'string') this.redirectTo = frame.url.replace(/^http/, 'ws');
        return;
      case 'ack':
        return;
      default:
        this.cb.onFrame(frame);   // answer, media, error without a ref
    }
  }

  event(frame) {
    if (this.syncing) return;                       // the snapshot will bring us up to date
    // 'skip' only for what the snapshot already holds; a gap is applied (see the top of this file).
    if (versionStep(this.cb.getVersion(), frame.version, this.lastWasEvent) === 'skip') return;
    this.lastWasEvent = true;
    this.cb.onEvent(frame.name, frame.data ?? {}, frame.version);
  }

  requestSync() {
    if (this.syncing) return;
    this.syncing = true;
    this.send('sync').catch(() => { this.syncing = false; });
  }

  keepResume(secret) {
    if (typeof secret !== 'string' && !(secret instanceof Uint8Array)) return;
    this.resume = secret;
    this.storage?.save(secret);
  }

  closed(ws, code, delayMs = null) {
    if (ws !== this.ws) return;
    this.ws = null;
    for (const { reject, timeout } of this.pending.values()) {
      clearTimeout(timeout);
      reject({ code: 'offline', message: 'connection closed' });
    }
    this.pending.clear();
    if (this.closedByUs) return;
    if (code === CLOSE.REDIRECT && this.redirectTo) {
      this.url = this.redirectTo;
      this.redirectTo = null;
      this.open();
      return;
    }
    if (FINAL.has(code) || code === CLOSE.BAD_TOKEN) {
      this.finish(code);
      return;
    }
    // Dropped network, 1013 store unavailable, rate limits: try again, resuming our seat.
    // Through the entry URL, not the process we were redirected to: that one may be gone,
    // and the entry redirects us to wherever the circle lives now (DESIGN §8).
    this.url = this.entryUrl;
    this.cb.onStatus('reconnecting', { code });
    const delay = delayMs ?? Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    this.timer = setTimeout(() => { this.timer = null; this.open(); }, delay);
  }

  finish(code) {
    const lostSeat = code === CLOSE.BAD_TOKEN && this.usedResume;
    this.resume = null;
    this.storage?.clear();
    removeEventListener('online', this.onOnline);
    this.cb.onStatus('closed', { code, lostSeat });
  }

  /** Close from our side (leave, leave_quietly); no reconnect. */
  close(code = CLOSE.NORMAL) {
    this.closedByUs = true;
    clearTimeout(this.timer);
    removeEventListener('online', this.onOnline);
    try { this.ws?.close(code); } catch { /* already closing */ }
  }

  /** Best effort, no ack awaited: used on the way out. */
  fire(type, fields = {}) { return this.rawSend({ type, ...fields }); }

  get bufferedAmount() { return this.ws?.bufferedAmount ?? 0; }
}
