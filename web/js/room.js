// Lobby → room → ended: session, state, media, the room's controls. circle.js loads it once the
// join form works, so the form never waits for it (nor for the msgpack codec).
import { t, suggestLanguage } from './i18n.js';
import { Session, CLOSE, wsUrl } from './protocol.js';
import { emptyState, loadSnapshot, applyEvent, self, key, mayBeHeard, isModerator } from './state.js';
import { Media, requestMicrophone, OWN_SPEAKING_LEVEL } from './media.js';
import {
  renderRoster, renderFloor, renderControls, renderPrompt, renderTimer, announce, showError, confirmStep,
} from './ui-room.js';

const $ = (sel) => document.querySelector(sel);

let app;                     // set by startRoom()
const state = emptyState();
let session = null;
let media = null;
let prompt = null;           // 'floor' | 'asked' | null
let audible = new Set();      // ids heard speaking now: slot levels read in the browser ∪ server levels
let slotAudible = new Set();
let levelAudible = new Set();
let leftNormally = false;    // pressed Leave (not the quiet one)
// RFC 6464 levels from the server's `levels` frame: 0 is loudest, 127 silence.
const SPEAKING_DBOV = 55;

function setAudible() {
  const next = new Set([...slotAudible, ...levelAudible]);
  const changed = next.size !== audible.size || [...next].some((id) => !audible.has(id));
  audible = next;
  if (changed) render();
}
let joined = null;           // {name, listenOnly, stream}
// Members never load the moderator's module; it comes in when the role is moderator.
const NO_MOD = {
  makeActions: null, updateActions: null, addNotice() {},
  render() { $('#mod-panel').hidden = true; },
};
let mod = NO_MOD;
let modLoading = null;

function ensureModeratorUi() {
  if (!isModerator(state) || modLoading) return;
  modLoading = import('./ui-mod.js').then(({ moderatorUi }) => {
    mod = moderatorUi({ getState: () => state, send });
    render();
  }).catch((err) => { modLoading = null; console.error(err); });
}

// ---- rendering ----
function render() {
  if (app.screens.current !== 'room') return;
  document.body.dataset.role = state.role ?? 'member';
  renderRoster(state, { makeActions: mod.makeActions, updateActions: mod.updateActions, audible });
  renderFloor(state);
  renderControls(state);
  renderPrompt(state, prompt);
  mod.render(state);
  media?.setSending(mayBeHeard(state));
}

function handleEffects(effects) {
  for (const fx of effects) {
    if ('prompt' in fx) prompt = fx.prompt;
    if (fx.announce) announce(t(fx.announce, fx.vars));
    if (fx.notice && isModerator(state)) {
      const text = t(fx.notice, fx.vars) + (fx.text ? ` “${fx.text}”` : '');
      mod.addNotice(fx.notice, text, fx.urgent);
    }
  }
}

async function send(type, fields) {
  try {
    showError(null);
    return await session.send(type, fields);
  } catch (err) {
    showError(err);
    return null;
  }
}

// ---- media ----
/**
 * On welcome and admitted (a resume's welcome too, wherever it landed): a new PeerConnection with
 * the ICE servers that frame carries (TURN credentials minted for this member; /client-config's
 * list if it carries none). Media watches it from then on and rebuilds it when it breaks.
 */
function startMedia(frame) {
  if (!media) {
    media = new Media({
      slots: app.config.slots,
      listenOnly: joined.listenOnly,
      stream: joined.stream,
      audioElements: [...document.querySelectorAll('audio[data-slot]')],
      onSpeaking(set, own) {
        if (own > OWN_SPEAKING_LEVEL && state.me != null) set.add(key(state.me));
        slotAudible = set;
        setAudible();
      },
      async negotiate(sdp) {
        try {
          const answer = await session.send('offer', { sdp });
          if (typeof answer?.sdp !== 'string') throw { code: 'media' };
          return answer.sdp;
        } catch (err) {
          if (err?.code !== 'offline' && err?.code !== 'timeout') showError({ code: 'media' });
          throw err;
        }
      },
      onStatus(status) { mediaStatus = status; renderConnection(); },
      onPathLost() { session?.reconnectNow(); },
    });
  }
  const minted = frame?.ice_servers;
  media.setIceServers(Array.isArray(minted) && minted.length ? minted : app.config.ice_servers);
  media.setSending(mayBeHeard(state));
  media.start();
}

// #connection-status: the socket's state (data-state) and the audio's (data-media). Only one
// line is shown: the socket's trouble first (media waits for it), else "reconnecting audio".
let socketStatus = 'idle';
let mediaStatus = 'idle';
function renderConnection() {
  const conn = $('#connection-status');
  conn.dataset.state = socketStatus;
  conn.dataset.media = mediaStatus;
  let text = '';
  if (socketStatus === 'reconnecting') text = t('conn.reconnecting');
  else if (mediaStatus === 'reconnecting' && socketStatus === 'open') text = t('conn.media_reconnecting');
  conn.textContent = text;
}

// ---- session callbacks ----
const callbacks = {
  getVersion: () => state.version,
  onJoined(kind, frame) {
    if (typeof frame.now === 'number') state.clockOffset = frame.now - Date.now();
    if (kind === 'lobby') {
      state.me = frame.member_id;
      $('#lobby-title').textContent = frame.circle?.title ?? '';
      suggestLanguage(frame.circle?.language);
      app.screens.show('lobby');
      return;
    }
    const snap = kind === 'snapshot' ? (frame.state ?? frame) : frame.state;
    loadSnapshot(state, snap ?? {}, kind === 'welcome' ? { member_id: frame.member_id, role: frame.role } : {});
    ensureModeratorUi();
    if (kind !== 'snapshot') {
      suggestLanguage(state.circle?.language);
      app.screens.show('room');
      startMedia(frame);
      if (kind === 'admitted') announce(t('announce.admitted'));
    }
    render();
  },
  onEvent(name, data, version) {
    handleEffects(applyEvent(state, name, data, version));
    render();
  },
  onFrame(frame) {
    // An answer is taken by the offer that asked for it (media.js: negotiate); one that comes
    // after its offer gave up belongs to a PeerConnection that is gone.
    if (frame.type === 'answer') return;
    if (frame.type === 'media') { media?.setSlots(frame.slots ?? []); render(); }
    else if (frame.type === 'levels') {
      levelAudible = new Set(Object.entries(frame.levels ?? {})
        .filter(([, level]) => level <= SPEAKING_DBOV).map(([id]) => key(id)));
      setAudible();
    }
    else if (frame.type === 'error') showError(frame);
  },
  onStatus(status, info = {}) {
    socketStatus = status;
    renderConnection();
    if (status === 'closed') ended(info);
  },
};

function ended({ code, lostSeat }) {
  media?.stop();
  media = null;
  const { store, keys, screens } = app;
  store.del(keys.seat);
  if (leftNormally) { store.del(keys.token); screens.ended('left'); return; }
  // A 4001 not asked for in this tab: the quiet way out.
  if (code === CLOSE.LEFT) { location.replace(app.config.exit_url || '/bye'); return; }
  let reason = 'error';
  if (lostSeat) reason = 'seat-lost';
  else if (code === CLOSE.ENDED) reason = 'ended';
  else if (code === CLOSE.FORBIDDEN) reason = screens.current === 'room' ? 'removed' : (screens.current === 'lobby' ? 'declined' : 'refused');
  else if (code === CLOSE.BAD_TOKEN) reason = 'invalid';
  else if (code === CLOSE.NO_CIRCLE) reason = 'no-circle';
  else if (code === CLOSE.FULL) reason = 'full';
  if (reason !== 'seat-lost') store.del(keys.token);
  screens.ended(reason);
}

function connect(token, resumeSecret) {
  const { circleId, store, keys } = app;
  const seat = { circle: circleId, token, name: joined.name, listenOnly: joined.listenOnly, resume: resumeSecret ?? null };
  session = new Session({
    hello: { token, name: joined.name, listen_only: joined.listenOnly },
    url: wsUrl('/ws', circleId),
    callbacks,
    storage: {
      load: () => seat.resume,
      save(secret) { if (typeof secret === 'string') { seat.resume = secret; store.set(keys.seat, seat); } },
      clear() { seat.resume = null; store.del(keys.seat); },
    },
  });
  session.open();
}

/**
 * The ordinary Leave (F8): asks, sends `leave` (the usual "left" for everyone, no quiet-leave
 * notice) and shows "you left" here. The quiet way out (leave.js) never asks.
 */
async function leave() {
  if (!session || leftNormally) return;
  if (!(await confirmStep('confirm.leave'))) return;
  leftNormally = true;
  try { media?.stop(); } catch { /* keep going */ }
  media = null;
  const current = session;
  try { await current.send('leave'); } catch { /* closed or offline: the server closes the seat itself */ }
  // An ack, then the server's 4001 (which lands in ended() too): the same screen either way.
  current.close();
  if (app.screens.current !== 'ended') ended({ code: CLOSE.LEFT });
}

function bindRoomControls() {
  $('#leave').addEventListener('click', leave);
  $('#mute-self').addEventListener('click', () => {
    const me = self(state);
    if (!me || me.listen_only) return;
    if (me.muted) { send('unmute_self'); return; }
    me.muted = true;                 // silence first, then tell the server
    media?.setSending(false);
    render();
    send('mute_self');
  });
  $('#raise-hand').addEventListener('click', () => send(self(state)?.hand ? 'lower_hand' : 'raise_hand'));
  $('#prompt-unmute').addEventListener('click', async () => {
    if (await send('unmute_self')) { prompt = null; render(); }
  });
  $('#prompt-dismiss').addEventListener('click', () => { prompt = null; render(); });
  $('#release-floor').addEventListener('click', () => send('release_floor'));
  $('#pass').addEventListener('click', () => send('pass'));
  $('#open-note').addEventListener('click', () => { $('#help-panel').hidden = true; app.togglePanel('#note-panel'); });
  $('#private-note').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const needSupport = form.elements.need_support.checked;
    const text = form.elements.text.value.trim() || (needSupport ? t('note.need_support_text') : '');
    if (!text) return;
    const status = $('#note-status');
    if (await send('private_note', { text: text.slice(0, 500), need_support: needSupport })) {
      form.reset();
      status.textContent = t('note.sent');
    }
  });
  $('#rejoin').addEventListener('click', async () => {
    const token = app.store.get(app.keys.token)?.token;
    if (!token) { app.screens.ended('invalid'); return; }
    state.version = null;
    $('#rejoin').hidden = true;
    $('#ended-status').dataset.reason = '';
    $('#ended-status').textContent = t('conn.connecting');
    if (!joined.listenOnly) joined.stream = await requestMicrophone().catch(() => null);
    connect(token, null);
  });
  document.addEventListener('lk:language', () => { render(); renderConnection(); });
  setInterval(() => { if (app.screens.current === 'room') renderTimer(state); }, 500);
}

/** ctx: {circleId, config, store, keys: {seat, token}, screens, togglePanel}; once, before join(). */
export function startRoom(ctx) {
  app = ctx;
  bindRoomControls();
}

/** Enter the circle as `who` ({name, listenOnly, stream}); `resumeSecret` to take back a seat. */
export function join(token, who, resumeSecret = null) {
  joined = who;
  connect(token, resumeSecret);
}

/** What the quiet way out must stop and tell (leave.js). */
export function current() { return { session, media }; }
