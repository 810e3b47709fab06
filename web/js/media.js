// Audio (DESIGN §7): one RTCPeerConnection, the mic as a sendrecv m-line first (absent when
// listening only), then S recvonly slots; complete (non-trickle) offer. No camera: audio only.
//
// Media that recovers (§7 "Real networks"): when the connection fails, stays `disconnected` for
// ~2 s, receives nothing at all for ~3 s while a STUN check of its own goes unanswered (Chrome
// takes 7 s or more to call a dead path `disconnected`), has its DTLS closed by the server, never
// connects, or the network changes, a new RTCPeerConnection (the same microphone track, the same
// slots) is offered on the same signaling session. That is our "ICE restart": aiortc cannot answer
// a real one, and the server replaces a member's PeerConnection on every offer without touching
// seat, floor or mutes. Attempts after the first back off (1 s, 2 s, … 30 s); nothing runs after
// stop().
//
// A path that is lost (failed, disconnected, silent, another network) is told to onPathLost: the
// signaling WebSocket went out the same way, and Chromium keeps a socket whose local address is
// gone OPEN for minutes (tests/net/test_browser_networks.py), so the offer would wait on it.

const GATHER_TIMEOUT_MS = 5000;
const SPEAKING_LEVEL = 0.03;
export const OWN_SPEAKING_LEVEL = 0.12;
const DISCONNECTED_GRACE_MS = 2000;   // Chrome may sit in `disconnected` far longer than that
const CONNECT_TIMEOUT_MS = 15000;     // answered but never connected: try again
const RETRY_BASE_MS = 1000;
const RETRY_MAX_MS = 30000;
const STABLE_MS = 10000;              // connected this long: the backoff starts over
// What arrives on a live path: RTP and RTCP when anyone is heard or we send (the server's receiver
// reports), and always the STUN answers to the browser's own checks (Chromium checks the selected
// pair every 2.5 s once it is stable; RFC 7675 consent checks come every 4-6 s) and the server's
// consent checks (aioice: every 4-6 s). A listener in a quiet circle gets no RTP or RTCP at all:
// bytes alone would call her path dead, and did, every ~5 s (tests/net/test_browser_networks.py).
// What arrived and how many checks went out are read twice a second; the path is gone when
// nothing arrived for SILENT_READS reads and a check of ours has gone unanswered for
// UNANSWERED_READS of them (on a live path every check is answered within a round trip), or when
// nothing arrived for MUTE_READS reads whatever the checks say (a browser that does not count
// them). Chromium after an address change: its next check goes out within 2.5 s, unanswered, and
// the rebuild starts 3-4 s after the last packet (its own `disconnected` comes 7 s in). (Counted in
// reads, not in clock time: a tab in the background reads less often and never looks silent.)
const WATCH_MS = 500;
const SILENT_READS = 6;
const UNANSWERED_READS = 2;
const MUTE_READS = 16;
// Reasons to rebuild that say the network path itself is gone (not the server's DTLS close, a
// refused or unanswered offer, or a connection that never came up).
const PATH_LOST = new Set(['failed', 'disconnected', 'silent', 'network']);

/** Ask for the microphone. Only ever called when the member chose to speak. */
export function requestMicrophone() {
  return navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    video: false,
  });
}

/** Level meter (0..1) from an AnalyserNode on a stream; returns stop(). */
export function watchLevel(stream, onLevel) {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx) return () => {};
  const ctx = new Ctx();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 512;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  let raf = 0;
  const tick = () => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const x of buf) sum += x * x;
    onLevel(Math.min(1, Math.sqrt(sum / buf.length) * 4));
    raf = requestAnimationFrame(tick);
  };
  ctx.resume().catch(() => {});
  tick();
  return () => { cancelAnimationFrame(raf); ctx.close().catch(() => {}); };
}

export class Media {
  /**
   * audioElements: the <audio data-slot> elements, one per slot.
   * negotiate(sdp): sends the offer on the signaling session and resolves with the answer's SDP;
   *   rejects with {code: 'offline'} while the session is down (its next welcome calls start()).
   * onStatus(status): 'connecting' (the first time) | 'connected' | 'reconnecting' | 'idle'.
   * onPathLost(reason): the network path is gone ('failed', 'disconnected', 'silent', 'network'),
   *   told as the rebuild starts; the socket that went out the same way may be dead too.
   */
  constructor({ iceServers, slots, listenOnly, stream, audioElements, onSpeaking, negotiate, onStatus, onPathLost }) {
    this.iceServers = [];
    this.setIceServers(iceServers);
    this.slotCount = Math.min(slots ?? 3, audioElements.length);
    this.listenOnly = listenOnly;
    this.stream = listenOnly ? null : stream;
    this.audio = audioElements;
    this.onSpeaking = onSpeaking ?? (() => {});
    this.negotiate = negotiate;
    this.onStatus = onStatus ?? (() => {});
    this.onPathLost = onPathLost ?? (() => {});
    this.slotMembers = new Array(this.slotCount).fill(null);
    this.pc = null;
    this.slotReceivers = [];
    this.levelTimer = null;
    this.status = 'idle';
    this.generation = 0;          // bumped for every new PeerConnection: older callbacks are stale
    this.attempts = 0;            // attempts since media was last connected for a while (the backoff)
    this.everConnected = false;
    this.retryTimer = null;
    this.graceTimer = null;
    this.connectTimer = null;
    this.stableTimer = null;
    this.watchTimer = null;
    this.stopped = false;
    this.netType = navigator.connection?.type;
    this.onNetwork = (ev) => this.networkChanged(ev);
    addEventListener('online', this.onNetwork);
    navigator.connection?.addEventListener?.('change', this.onNetwork);
  }

  get micTrack() { return this.stream?.getAudioTracks()[0] ?? null; }

  /** Allow or stop sending: a disabled track sends silence (nothing of the room is heard). */
  setSending(on) { if (this.micTrack) this.micTrack.enabled = !!on; }

  /**
   * The RTCIceServer list for the next PeerConnection (welcome's and admitted's: TURN credentials
   * minted for this member, fresh on every resume). A connection keeps the list it was built with;
   * every rebuild takes the newest.
   */
  setIceServers(list) {
    if (!Array.isArray(list)) return;
    this.iceServers = list.filter((s) => s && (typeof s.urls === 'string' || Array.isArray(s.urls)));
  }

  /** Connect afresh, now: on welcome and admitted (a resume's welcome too). */
  start() {
    if (this.stopped) return;
    this.attempts = 0;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.connect();
  }

  setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this.onStatus(status);
  }

  /** Build a PeerConnection, offer it, apply the answer. Trouble on the way: recover(). */
  async connect() {
    if (this.stopped) return;
    clearTimeout(this.graceTimer);
    clearTimeout(this.connectTimer);
    this.graceTimer = this.connectTimer = null;
    const gen = ++this.generation;
    this.setStatus(this.everConnected || this.attempts > 0 ? 'reconnecting' : 'connecting');
    try {
      const sdp = await this.createOffer(gen);
      if (gen !== this.generation) return;
      const answer = await this.negotiate(sdp);
      if (gen !== this.generation) return;
      await this.pc.setRemoteDescription({ type: 'answer', sdp: answer });
    } catch (err) {
      if (gen !== this.generation || this.stopped) return;
      // The session is down: it resumes by itself (or ends), and its welcome starts us again.
      if (err?.code === 'offline') return;
      this.recover('offer');
      return;
    }
    if (gen !== this.generation || this.stopped) return;
    this.watchDtls(this.pc, gen);
    this.check(this.pc, gen);
    if (this.status !== 'connected') {
      this.connectTimer = setTimeout(() => { if (gen === this.generation) this.recover('timeout'); }, CONNECT_TIMEOUT_MS);
    }
  }

  /** Media is lost (or never came): a new PeerConnection, at once the first time, then backing off. */
  recover(reason) {
    if (this.stopped || this.retryTimer) return;
    clearTimeout(this.graceTimer);
    clearTimeout(this.connectTimer);
    clearTimeout(this.stableTimer);
    clearInterval(this.watchTimer);
    this.graceTimer = this.connectTimer = this.stableTimer = this.watchTimer = null;
    this.generation += 1;            // from now on the old connection's news is stale
    this.lastReason = reason;
    this.setStatus('reconnecting');
    if (PATH_LOST.has(reason)) this.onPathLost(reason);
    const n = this.attempts++;
    const delay = n === 0 ? 0 : Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** (n - 1)) * (0.75 + Math.random() / 2);
    this.retryTimer = setTimeout(() => { this.retryTimer = null; this.connect(); }, delay);
  }

  /** On every state change of the current connection. */
  check(pc, gen) {
    if (gen !== this.generation || this.stopped || !pc.remoteDescription) return;
    const state = pc.connectionState ?? pc.iceConnectionState;
    const ice = pc.iceConnectionState;
    if (state === 'failed' || ice === 'failed' || state === 'closed') { this.recover('failed'); return; }
    if (state === 'disconnected' || ice === 'disconnected') {
      this.graceTimer ??= setTimeout(() => {
        this.graceTimer = null;
        if (gen === this.generation) this.recover('disconnected');
      }, DISCONNECTED_GRACE_MS);
      return;
    }
    clearTimeout(this.graceTimer);
    this.graceTimer = null;
    if (state === 'connected' || state === 'completed') {
      clearTimeout(this.connectTimer);
      this.connectTimer = null;
      // A connection that dies as soon as it is up (again and again) must not be rebuilt at once
      // every time: the backoff starts over only once one has lasted.
      this.stableTimer ??= setTimeout(() => { if (gen === this.generation) this.attempts = 0; }, STABLE_MS);
      this.everConnected = true;
      this.setStatus('connected');
      this.watchSilence(pc, gen);
    }
  }

  /** While connected: what arrived and the checks sent, twice a second; a path gone, recover(). */
  watchSilence(pc, gen) {
    if (this.watchTimer) return;
    let read = 0;
    let last = null;              // what had arrived at the previous read
    let lastSent = null;          // checks sent by then
    let arrivedAt = 0;            // the read that last saw something new
    let checkAt = null;           // the first read that saw a check go out after that
    const timer = setInterval(async () => {
      if (gen !== this.generation || this.stopped) { clearInterval(timer); return; }
      if (pc.connectionState !== 'connected') return;   // the state checks deal with that
      let now;
      try { now = arrivals(await pc.getStats()); } catch { return; }
      if (gen !== this.generation || now.seen === null) return;
      read += 1;
      if (now.seen !== last) {
        arrivedAt = read;
        checkAt = null;
      } else if (checkAt === null && now.sent !== null && lastSent !== null && now.sent > lastSent) {
        checkAt = read;
      }
      last = now.seen;
      lastSent = now.sent;
      const quiet = read - arrivedAt;
      const unanswered = checkAt !== null && read - checkAt >= UNANSWERED_READS;
      if ((quiet >= SILENT_READS && unanswered) || quiet >= MUTE_READS) this.recover('silent');
    }, WATCH_MS);
    this.watchTimer = timer;
  }

  /** The server closing our PeerConnection (DTLS close_notify) leaves ICE looking fine for a while. */
  watchDtls(pc, gen) {
    const dtls = pc.getTransceivers().map((tr) => tr.receiver.transport).find(Boolean);
    if (!dtls) return;
    const onState = () => {
      if (gen !== this.generation) { dtls.removeEventListener('statechange', onState); return; }
      if (dtls.state === 'closed' || dtls.state === 'failed') this.recover('closed');
    };
    dtls.addEventListener('statechange', onState);
  }

  /** window 'online', navigator.connection 'change': another network, another path to find. */
  networkChanged(ev) {
    if (this.stopped || !this.pc) return;
    const type = navigator.connection?.type;
    const moved = ev.type === 'online' || (type !== undefined && type !== this.netType);
    this.netType = type;
    // A 'change' that is only a new bandwidth estimate is no reason, unless the connection is in
    // trouble already: then there is no point waiting out the grace period.
    const state = this.pc.connectionState ?? this.pc.iceConnectionState;
    if (moved || state === 'disconnected') this.recover('network');
  }

  /** Build the connection (generation `gen`) and return the complete offer SDP. */
  async createOffer(gen = this.generation) {
    this.closePeer();
    const pc = makePeer(this.iceServers);
    this.pc = pc;
    const check = () => this.check(pc, gen);
    pc.addEventListener('connectionstatechange', check);
    pc.addEventListener('iceconnectionstatechange', check);
    if (!this.listenOnly) {
      // A sendrecv m-line even when the mic failed, so the m-line layout stays what the server expects.
      if (this.micTrack) pc.addTransceiver(this.micTrack, { direction: 'sendrecv', streams: [this.stream] });
      else pc.addTransceiver('audio', { direction: 'sendrecv' });
    }
    this.slotReceivers = [];
    for (let i = 0; i < this.slotCount; i++) {
      const tr = pc.addTransceiver('audio', { direction: 'recvonly' });
      this.slotReceivers.push(tr.receiver);
      const el = this.audio[i];
      el.srcObject = new MediaStream([tr.receiver.track]);
      el.play?.().catch(() => {});
    }
    // One track per <audio>: the answer may put every slot in one stream (ev.streams[0] then
    // holds all S tracks, and each element would play every slot, and WebAudio picks one of them).
    pc.ontrack = (ev) => {
      const slot = this.slotReceivers.indexOf(ev.receiver);
      if (slot < 0) return;
      const el = this.audio[slot];
      const tracks = el.srcObject?.getTracks?.() ?? [];
      if (tracks.length === 1 && tracks[0] === ev.track) return;
      el.srcObject = new MediaStream([ev.track]);
      el.play?.().catch(() => {});
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc);
    this.startLevels();
    return pc.localDescription.sdp;
  }

  /** media {slots}: who is heard in which slot. */
  setSlots(slots) {
    for (let i = 0; i < this.slotCount; i++) {
      const id = slots?.[i] ?? null;
      this.slotMembers[i] = id;
      if (id == null) this.audio[i].removeAttribute('data-member-id');
      else this.audio[i].dataset.memberId = String(id);
    }
  }

  /** Speaking indicators from the ssrc-audio-level the browser reads off each slot's RTP. */
  startLevels() {
    clearInterval(this.levelTimer);
    this.levelTimer = setInterval(() => {
      const speaking = new Set();
      this.slotReceivers.forEach((rx, i) => {
        const id = this.slotMembers[i];
        if (id == null || !rx.getSynchronizationSources) return;
        const level = Math.max(0, ...rx.getSynchronizationSources().map((s) => s.audioLevel ?? 0));
        if (level > SPEAKING_LEVEL) speaking.add(String(id));
      });
      this.onSpeaking(speaking, this.ownLevel());
    }, 250);
  }

  /** Our own mic level (0..1) while we send, polled with the slots (no animation frame loop). */
  ownLevel() {
    const track = this.micTrack;
    if (!track || !track.enabled) return 0;
    if (!this.ownAnalyser) {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (!Ctx) return 0;
      this.ownCtx = new Ctx();
      this.ownAnalyser = this.ownCtx.createAnalyser();
      this.ownAnalyser.fftSize = 512;
      this.ownCtx.createMediaStreamSource(this.stream).connect(this.ownAnalyser);
      this.ownBuf = new Float32Array(this.ownAnalyser.fftSize);
    }
    this.ownAnalyser.getFloatTimeDomainData(this.ownBuf);
    let sum = 0;
    for (const x of this.ownBuf) sum += x * x;
    return Math.sqrt(sum / this.ownBuf.length) * 4;
  }

  /** Silence every slot at once (first step of leaving quietly). */
  silence() { for (const el of this.audio) { el.muted = true; el.pause?.(); } }

  closePeer() {
    clearInterval(this.levelTimer);
    clearInterval(this.watchTimer);
    clearTimeout(this.stableTimer);
    this.watchTimer = this.stableTimer = null;
    if (this.pc) { try { this.pc.close(); } catch { /* closed */ } }
    this.pc = null;
  }

  /** Stop everything: tracks, connection, playback, recovery. Safe to call twice. */
  stop() {
    this.stopped = true;
    this.generation += 1;
    clearTimeout(this.retryTimer);
    clearTimeout(this.graceTimer);
    clearTimeout(this.connectTimer);
    removeEventListener('online', this.onNetwork);
    navigator.connection?.removeEventListener?.('change', this.onNetwork);
    this.silence();
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.closePeer();
    this.ownCtx?.close().catch(() => {});
    for (const el of this.audio) el.srcObject = null;
    this.setStatus('idle');
  }
}

/**
 * seen: a count that grows with everything that arrived on the connection: the bytes of its
 * transport (RTP, RTCP, DTLS; Chromium counts no STUN in them) and, on every candidate pair, the
 * STUN answers to our checks and the STUN checks from the server (null when the stats carry none of
 * it). sent: the STUN checks sent on every candidate pair, or null when they are not counted.
 */
function arrivals(stats) {
  let transport = null;
  let pair = null;
  let stun = null;
  let sent = null;
  const add = (sum, n) => (typeof n === 'number' ? (sum ?? 0) + n : sum);
  stats.forEach((r) => {
    if (r.type === 'transport') transport = add(transport, r.bytesReceived);
    if (r.type !== 'candidate-pair') return;
    if (r.nominated) pair = add(pair, r.bytesReceived);
    stun = add(add(stun, r.responsesReceived), r.requestsReceived);
    sent = add(sent, r.requestsSent);
  });
  const bytes = transport ?? pair;
  return { seen: bytes === null && stun === null ? null : (bytes ?? 0) + (stun ?? 0), sent };
}

/** A PeerConnection with these ICE servers; without them if the browser refuses the list. */
function makePeer(iceServers) {
  const config = { iceServers, bundlePolicy: 'max-bundle' };
  try {
    return new RTCPeerConnection(config);
  } catch {
    return new RTCPeerConnection({ ...config, iceServers: [] });
  }
}

function gatheringComplete(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); pc.removeEventListener('icegatheringstatechange', check); resolve(); };
    const check = () => { if (pc.iceGatheringState === 'complete') done(); };
    // A slow STUN/TURN server must not hold the join: send what we have after a few seconds.
    const timer = setTimeout(done, GATHER_TIMEOUT_MS);
    pc.addEventListener('icegatheringstatechange', check);
  });
}
