// node --test web/tests/ — media.js's recovery rules (DESIGN §7 "Real networks") against a fake
// RTCPeerConnection and mocked timers: what makes it build a new PeerConnection, when, with which
// ICE servers, and what never does. tests/e2e/test_media_recovery.py does it in Chromium.
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

// ---- a browser, as far as media.js sees one ----
const win = new EventTarget();
globalThis.addEventListener = win.addEventListener.bind(win);
globalThis.removeEventListener = win.removeEventListener.bind(win);
const connection = Object.assign(new EventTarget(), { type: 'wifi' });
Object.defineProperty(globalThis, 'navigator', { value: { connection }, configurable: true });
globalThis.MediaStream = class { constructor(tracks) { this.tracks = tracks; } getTracks() { return this.tracks; } };

class FakeDtls extends EventTarget {
  state = 'new';
  set(state) { this.state = state; this.dispatchEvent(new Event('statechange')); }
}

class FakePC extends EventTarget {
  static all = [];
  constructor(config) {
    super();
    this.config = config;
    this.connectionState = 'new';
    this.iceConnectionState = 'new';
    this.iceGatheringState = 'new';
    this.localDescription = null;
    this.remoteDescription = null;
    this.transceivers = [];
    this.dtls = new FakeDtls();
    this.bytes = 0;
    this.silent = false;        // true: getStats shows no new byte
    this.checks = 0;            // STUN checks sent on the selected pair: one every checkEvery ms
    this.checkEvery = 2500;     // Chromium's, once the pair is stable
    this.answers = 0;           // and the answers to them
    this.answering = true;      // false: checks go unanswered (the path is gone)
    this.countsChecks = true;   // false: a browser whose stats carry no requestsSent
    this.checkedAt = Date.now();
    this.closed = false;
    FakePC.all.push(this);
  }
  getConfiguration() { return this.config; }
  addTransceiver(what, init) {
    const tr = { direction: init.direction, receiver: { track: { kind: 'audio' }, transport: this.dtls, getSynchronizationSources: () => [] } };
    this.transceivers.push(tr);
    return tr;
  }
  getTransceivers() { return this.transceivers; }
  async createOffer() { return { type: 'offer', sdp: `offer ${FakePC.all.indexOf(this)}` }; }
  async setLocalDescription(d) { this.localDescription = d; this.iceGatheringState = 'complete'; }
  async setRemoteDescription(d) { this.remoteDescription = d; }
  async getStats() {
    if (!this.silent) this.bytes += 100;
    while (Date.now() - this.checkedAt >= this.checkEvery) {
      this.checkedAt += this.checkEvery;
      this.checks += 1;
      if (this.answering) this.answers += 1;
    }
    const pair = { type: 'candidate-pair', nominated: true, bytesReceived: this.bytes, responsesReceived: this.answers, requestsReceived: 0 };
    if (this.countsChecks) pair.requestsSent = this.checks;
    return new Map([['T', { type: 'transport', bytesReceived: this.bytes, selectedCandidatePairId: 'P' }], ['P', pair]]);
  }
  close() { this.closed = true; }
  set(state) {
    this.connectionState = state;
    this.iceConnectionState = state === 'connecting' ? 'checking' : state;
    this.dispatchEvent(new Event('iceconnectionstatechange'));
    this.dispatchEvent(new Event('connectionstatechange'));
  }
}
globalThis.RTCPeerConnection = FakePC;

const { Media } = await import('../js/media.js');

const audio = () => ({ dataset: {}, srcObject: null, play: async () => {}, pause() {}, removeAttribute() {} });
const track = { kind: 'audio', enabled: false, stop() {} };
// Promises settled, then what is due now (a retry "at once" is a timer of 0 ms), then promises again.
const flush = async () => {
  await new Promise((resolve) => setImmediate(resolve));
  mock.timers.tick(0);
  await new Promise((resolve) => setImmediate(resolve));
};
const last = () => FakePC.all[FakePC.all.length - 1];

/** A Media whose signaling answers every offer (or as `answer(sdp)` says), with a log. */
function makeMedia({ answer } = {}) {
  const log = { offers: [], statuses: [], lost: [] };
  const media = new Media({
    slots: 3,
    listenOnly: false,
    stream: { getAudioTracks: () => [track], getTracks: () => [track] },
    audioElements: [audio(), audio(), audio()],
    async negotiate(sdp) {
      log.offers.push({ sdp, at: Date.now() });
      return answer ? answer(sdp) : `answer to ${sdp}`;
    },
    onStatus: (s) => log.statuses.push(s),
    onPathLost: (reason) => log.lost.push(reason),
  });
  return { media, log };
}

/** start() and bring the first connection up. */
async function connected(options) {
  const made = makeMedia(options);
  made.media.setIceServers([{ urls: 'stun:stun.example.org' }]);
  made.media.start();
  await flush();
  last().set('connected');
  return made;
}

beforeEach(() => {
  FakePC.all = [];
  connection.type = 'wifi';
  mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'] });
});
afterEach(() => mock.timers.reset());

test('start offers on the session, applies the answer, and is connected', async () => {
  const { media, log } = makeMedia();
  media.setIceServers([{ urls: 'turn:turn.example.org', username: '9:m1', credential: 'x' }, { nope: 1 }, null]);
  media.start();
  await flush();
  assert.equal(FakePC.all.length, 1);
  assert.deepEqual(last().config.iceServers, [{ urls: 'turn:turn.example.org', username: '9:m1', credential: 'x' }]);
  assert.deepEqual(last().transceivers.map((t) => t.direction), ['sendrecv', 'recvonly', 'recvonly', 'recvonly']);
  assert.deepEqual(log.offers.map((o) => o.sdp), ['offer 0']);
  assert.equal(last().remoteDescription.sdp, 'answer to offer 0');
  last().set('connected');
  assert.deepEqual(log.statuses, ['connecting', 'connected']);
  media.stop();
});

test('failed: a new PeerConnection at once, same tracks and slots, with the newest ICE servers', async () => {
  const { media, log } = await connected();
  const first = last();
  media.setIceServers([{ urls: 'turn:turn.example.org', username: '99:m1', credential: 'fresh' }]);
  first.set('failed');
  await flush();
  assert.equal(FakePC.all.length, 2);
  assert.ok(first.closed);
  assert.deepEqual(last().config.iceServers, [{ urls: 'turn:turn.example.org', username: '99:m1', credential: 'fresh' }]);
  assert.deepEqual(last().transceivers.map((t) => t.direction), ['sendrecv', 'recvonly', 'recvonly', 'recvonly']);
  assert.equal(log.offers.length, 2);
  assert.deepEqual(log.statuses, ['connecting', 'connected', 'reconnecting']);
  last().set('connected');
  assert.equal(log.statuses.at(-1), 'connected');
  first.set('failed');                       // the old one's news is stale
  await flush();
  assert.equal(FakePC.all.length, 2);
  media.stop();
});

test('disconnected: a new PeerConnection after 2 s of it, none if it comes back sooner', async () => {
  const { media } = await connected();
  last().set('disconnected');
  mock.timers.tick(1900);
  await flush();
  last().set('connected');
  mock.timers.tick(10000);
  await flush();
  assert.equal(FakePC.all.length, 1);
  last().set('disconnected');
  mock.timers.tick(1999);
  await flush();
  assert.equal(FakePC.all.length, 1);
  mock.timers.tick(1);
  await flush();
  assert.equal(FakePC.all.length, 2);
  assert.equal(media.lastReason, 'disconnected');
  media.stop();
});

test('the server closing the DTLS transport: a new PeerConnection at once', async () => {
  const { media } = await connected();
  last().dtls.set('closed');
  await flush();
  assert.equal(FakePC.all.length, 2);
  assert.equal(media.lastReason, 'closed');
  media.stop();
});

/** Reads (500 ms apart) until a second PeerConnection is made, at most `most`; null if none. */
async function readsUntilRebuilt(most) {
  for (let read = 1; read <= most; read++) {
    mock.timers.tick(500);
    await flush();
    if (FakePC.all.length > 1) return read;
  }
  return null;
}

test('a path gone (nothing arrives, our checks unanswered): a new PeerConnection after 3-4 s', async () => {
  const { media } = await connected();
  for (let i = 0; i < 20; i++) { mock.timers.tick(500); await flush(); }
  assert.equal(FakePC.all.length, 1, 'a path that carries bytes is left alone');
  last().silent = true;
  last().answering = false;
  const read = await readsUntilRebuilt(10);
  assert.ok(read >= 6 && read <= 8, `rebuilt at read ${read}`);
  assert.equal(media.lastReason, 'silent');
  media.stop();
});

test('a quiet circle: no RTP or RTCP at all, only STUN answers every 2.5 s, is a live path', async () => {
  const { media } = await connected();
  last().silent = true;                       // a listener, nobody heard: the server sends nothing
  assert.equal(await readsUntilRebuilt(120), null, 'rebuilt a quiet but live connection');
  last().answering = false;                   // and then the path goes: no answer any more
  const read = await readsUntilRebuilt(12);
  assert.ok(read !== null && read <= 10, `rebuilt at read ${read}`);
  assert.equal(media.lastReason, 'silent');
  media.stop();
});

test('checks every 5 s, each answered, and nothing else: left alone; unanswered: rebuilt', async () => {
  const { media } = await connected();
  last().silent = true;                       // a quiet circle in a browser that checks less often
  last().checkEvery = 5000;
  assert.equal(await readsUntilRebuilt(60), null, 'quiet spells between answered checks are no dead path');
  last().answering = false;
  const read = await readsUntilRebuilt(14);
  assert.ok(read !== null && read >= 6, `rebuilt at read ${read}`);
  assert.equal(media.lastReason, 'silent');
  media.stop();
});

test('a browser that counts no checks: a new PeerConnection after 8 s with nothing at all', async () => {
  const { media } = await connected();
  for (let i = 0; i < 4; i++) { mock.timers.tick(500); await flush(); }
  last().countsChecks = false;
  last().silent = true;
  last().answering = false;
  assert.equal(await readsUntilRebuilt(20), 16);
  assert.equal(media.lastReason, 'silent');
  media.stop();
});

test('a lost path is told to onPathLost (the socket went that way too); a server close or a refusal is not', async () => {
  const { media, log } = await connected({ answer: (sdp) => {
    if (sdp === 'offer 3') throw { code: 'bad_frame' };
    return `answer to ${sdp}`;
  } });
  last().set('failed');
  await flush();
  last().set('connected');
  mock.timers.tick(10000);                    // lasted: the next loss rebuilds at once
  win.dispatchEvent(new Event('online'));
  await flush();
  last().set('connected');
  mock.timers.tick(10000);
  last().dtls.set('closed');                  // the server's close: the path is fine
  await flush();
  assert.equal(log.offers.length, 4);         // offer 3 refused: a retry after backoff
  mock.timers.tick(2000);
  await flush();
  last().set('connected');
  mock.timers.tick(10000);
  last().set('disconnected');
  mock.timers.tick(2000);
  await flush();
  last().set('connected');
  mock.timers.tick(10000);
  last().silent = true;
  last().answering = false;
  for (let i = 0; i < 10; i++) { mock.timers.tick(500); await flush(); }
  assert.equal(media.lastReason, 'silent');
  assert.deepEqual(log.lost, ['failed', 'network', 'disconnected', 'silent']);
  media.stop();
});

test('another network: online, or another connection type; a new bandwidth estimate is not', async () => {
  const { media } = await connected();
  connection.dispatchEvent(new Event('change'));            // same type: an estimate changed
  await flush();
  assert.equal(FakePC.all.length, 1);
  connection.type = 'cellular';
  connection.dispatchEvent(new Event('change'));
  await flush();
  assert.equal(FakePC.all.length, 2);
  last().set('connected');
  mock.timers.tick(10000);
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(FakePC.all.length, 3);
  assert.equal(media.lastReason, 'network');
  media.stop();
});

test('answered but never connected: tried again after 15 s', async () => {
  const { media } = makeMedia();
  media.start();
  await flush();
  last().set('connecting');
  mock.timers.tick(14999);
  await flush();
  assert.equal(FakePC.all.length, 1);
  mock.timers.tick(1);
  await flush();
  assert.equal(FakePC.all.length, 2);
  assert.equal(media.lastReason, 'timeout');
  media.stop();
});

test('while the session is down nothing is retried; its welcome (start) rebuilds', async () => {
  let offline = false;
  const { media, log } = await connected({
    answer: (sdp) => { if (offline) throw { code: 'offline' }; return `answer to ${sdp}`; },
  });
  offline = true;
  last().set('failed');
  await flush();
  assert.equal(log.offers.length, 2);
  mock.timers.tick(120000);
  await flush();
  assert.equal(log.offers.length, 2, 'offers sent into a closed session');
  assert.equal(log.statuses.at(-1), 'reconnecting');
  offline = false;
  media.start();
  await flush();
  assert.equal(log.offers.length, 3);
  last().set('connected');
  assert.equal(log.statuses.at(-1), 'connected');
  media.stop();
});

test('refused offers back off: at once, then about 1, 2, 4, 8, 16 s, and never more than 30 s', async () => {
  const { media, log } = makeMedia({ answer: () => { throw { code: 'bad_frame' }; } });
  media.start();
  for (let ms = 0; ms < 200000; ms += 50) { mock.timers.tick(50); await flush(); }
  const gaps = log.offers.slice(1).map((o, i) => o.at - log.offers[i].at);
  assert.ok(gaps[0] <= 50, `first retry after ${gaps[0]} ms`);
  const expected = [1000, 2000, 4000, 8000, 16000, 30000, 30000];
  expected.forEach((base, i) => {
    const gap = gaps[i + 1];
    assert.ok(gap >= base * 0.75 && gap <= base * 1.25 + 50, `retry ${i + 2} after ${gap} ms, expected about ${base}`);
  });
  assert.ok(Math.max(...gaps) <= 30000 * 1.25 + 50);
  media.stop();
});

test('a connection that dies as soon as it is up is not rebuilt at once every time', async () => {
  const { media } = await connected();
  last().set('failed');
  await flush();
  assert.equal(FakePC.all.length, 2, 'the first loss: at once');
  last().set('connected');
  last().set('failed');
  await flush();
  assert.equal(FakePC.all.length, 2, 'lost again right away: not at once');
  mock.timers.tick(1250);
  await flush();
  assert.equal(FakePC.all.length, 3);
  last().set('connected');
  mock.timers.tick(10000);                    // it lasted: the backoff starts over
  await flush();
  last().set('failed');
  await flush();
  assert.equal(FakePC.all.length, 4);
  media.stop();
});

test('an answer to an offer given up is never applied to the newer PeerConnection', async () => {
  const held = [];
  const { media } = makeMedia({ answer: (sdp) => new Promise((resolve) => held.push(() => resolve(`answer to ${sdp}`))) });
  media.start();
  await flush();
  media.start();                              // a resume's welcome, while the first offer waits
  await flush();
  assert.equal(held.length, 2);
  held[1]();
  await flush();
  held[0]();
  await flush();
  assert.equal(FakePC.all[1].remoteDescription.sdp, 'answer to offer 1');
  assert.equal(FakePC.all[0].remoteDescription, null);
  assert.ok(FakePC.all[0].closed);
  media.stop();
});

test('stop() ends it: no rebuild for any reason, the network no longer watched', async () => {
  const { media, log } = await connected();
  const pc = last();
  media.stop();
  assert.ok(pc.closed);
  assert.equal(log.statuses.at(-1), 'idle');
  pc.set('failed');
  pc.dtls.set('closed');
  win.dispatchEvent(new Event('online'));
  connection.type = 'cellular';
  connection.dispatchEvent(new Event('change'));
  mock.timers.tick(120000);
  await flush();
  media.start();
  await flush();
  assert.equal(FakePC.all.length, 1);
  assert.equal(log.offers.length, 1);
});
