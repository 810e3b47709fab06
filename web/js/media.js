// Audio (DESIGN §7): one RTCPeerConnection, the mic as a sendrecv m-line first (absent when
// listening only), then S recvonly slots; complete (non-trickle) offer. No camera: audio only.

const GATHER_TIMEOUT_MS = 5000;
const SPEAKING_LEVEL = 0.03;
export const OWN_SPEAKING_LEVEL = 0.12;

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
  /** audioElements: the <audio data-slot> elements, one per slot. */
  constructor({ iceServers, slots, listenOnly, stream, audioElements, onSpeaking }) {
    this.iceServers = iceServers ?? [];
    this.slotCount = Math.min(slots ?? 3, audioElements.length);
    this.listenOnly = listenOnly;
    this.stream = listenOnly ? null : stream;
    this.audio = audioElements;
    this.onSpeaking = onSpeaking ?? (() => {});
    this.slotMembers = new Array(this.slotCount).fill(null);
    this.pc = null;
    this.slotReceivers = [];
    this.levelTimer = null;
  }

  get micTrack() { return this.stream?.getAudioTracks()[0] ?? null; }

  /** Allow or stop sending: a disabled track sends silence (nothing of the room is heard). */
  setSending(on) { if (this.micTrack) this.micTrack.enabled = !!on; }

  /** Build the connection and return the complete offer SDP. */
  async createOffer() {
    this.closePeer();
    const pc = new RTCPeerConnection({ iceServers: this.iceServers, bundlePolicy: 'max-bundle' });
    this.pc = pc;
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

  async acceptAnswer(sdp) {
    if (this.pc && this.pc.signalingState === 'have-local-offer') {
      await this.pc.setRemoteDescription({ type: 'answer', sdp });
    }
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
    if (this.pc) { try { this.pc.close(); } catch { /* closed */ } }
    this.pc = null;
  }

  /** Stop everything: tracks, connection, playback. Safe to call twice. */
  stop() {
    this.silence();
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.closePeer();
    this.ownCtx?.close().catch(() => {});
    for (const el of this.audio) el.srcObject = null;
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
