// /c/{circle}: join → lobby → room. Wires the session, the state, media and the screens.
import { initI18n, bindLanguageSwitch, suggestLanguage, t } from './i18n.js';
import { Session, CLOSE } from './protocol.js';
import { emptyState, loadSnapshot, applyEvent, self, key, mayBeHeard, isModerator } from './state.js';
import { Media, requestMicrophone, OWN_SPEAKING_LEVEL } from './media.js';
import { installQuietLeave } from './leave.js';
import { runJoin } from './ui-join.js';
import {
  renderRoster, renderFloor, renderControls, renderPrompt, renderTimer, announce, showError,
} from './ui-room.js';
import { loadConfig, renderHelplines } from './config.js';

const $ = (sel) => document.querySelector(sel);
const circleId = decodeURIComponent(location.pathname.split('/').filter(Boolean).pop() ?? '');
const SEAT_KEY = 'lk.seat';
const TOKEN_KEY = 'lk.token';

const state = emptyState();
let config;
let session = null;
let media = null;
let prompt = null;           // 'floor' | 'asked' | null
let audible = new Set();      // ids heard speaking now: slot levels read in the browser ∪ server levels
let slotAudible = new Set();
let levelAudible = new Set();
// RFC 6464 levels from the server's `levels` frame: 0 is loudest, 127 silence.
const SPEAKING_DBOV = 55;

function setAudible() {
  const next = new Set([...slotAudible, ...levelAudible]);
  const changed = next.size !== audible.size || [...next].some((id) => !audible.has(id));
  audible = next;
  if (changed) render();
}
let joined = null;           // {name, listenOnly, stream}
let lastScreen = 'join';
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

// ---- storage (this tab only; cleared on any leave) ----
const store = {
  get(k) { try { return JSON.parse(sessionStorage.getItem(k)); } catch { return null; } },
  set(k, v) { try { sessionStorage.setItem(k, JSON.stringify(v)); } catch { /* private mode */ } },
  del(k) { try { sessionStorage.removeItem(k); } catch { /* private mode */ } },
};

/** The invite token comes in the fragment (#t=…); keep it for this tab and take it off the address bar. */
function readToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fresh = params.get('t');
  if (fresh) {
    const saved = store.get(SEAT_KEY);
    if (saved && saved.token !== fresh) store.del(SEAT_KEY);   // a new link is a new join
    store.set(TOKEN_KEY, { circle: circleId, token: fresh });
    history.replaceState(null, '', location.pathname);
    return fresh;
  }
  const kept = store.get(TOKEN_KEY);
  return kept?.circle === circleId ? kept.token : null;
}

function showScreen(name) {
  lastScreen = name;
  document.body.dataset.screen = name;
  for (const s of document.querySelectorAll('.screen')) s.hidden = s.id !== `screen-${name}`;
  if (name !== 'room') { $('#note-panel').hidden = true; }
}

// ---- rendering ----
function render() {
  if (lastScreen !== 'room') return;
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
async function startMedia() {
  if (!media) {
    media = new Media({
      iceServers: config.ice_servers,
      slots: config.slots,
      listenOnly: joined.listenOnly,
      stream: joined.stream,
      audioElements: [...document.querySelectorAll('audio[data-slot]')],
      onSpeaking(set, own) {
        if (own > OWN_SPEAKING_LEVEL && state.me != null) set.add(key(state.me));
        slotAudible = set;
        setAudible();
      },
    });
  }
  media.setSending(mayBeHeard(state));
  try {
    const sdp = await media.createOffer();
    await session.send('offer', { sdp });
  } catch (err) {
    showError(err?.code ? err : { code: 'media' });
  }
}

function ensureSlots(count) {
  const box = document.querySelector('.slots');
  for (let i = box.children.length; i < count; i++) {
    const el = document.createElement('audio');
    el.autoplay = true;
    el.dataset.slot = String(i);
    box.append(el);
  }
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
      showScreen('lobby');
      return;
    }
    const snap = kind === 'snapshot' ? (frame.state ?? frame) : frame.state;
    loadSnapshot(state, snap ?? {}, kind === 'welcome' ? { member_id: frame.member_id, role: frame.role } : {});
    ensureModeratorUi();
    if (kind !== 'snapshot') {
      suggestLanguage(state.circle?.language);
      showScreen('room');
      startMedia();
      if (kind === 'admitted') announce(t('announce.admitted'));
    }
    render();
  },
  onEvent(name, data, version) {
    handleEffects(applyEvent(state, name, data, version));
    render();
  },
  onFrame(frame) {
    if (frame.type === 'answer') media?.acceptAnswer(frame.sdp).catch(() => showError({ code: 'media' }));
    else if (frame.type === 'media') { media?.setSlots(frame.slots ?? []); render(); }
    else if (frame.type === 'levels') {
      levelAudible = new Set(Object.entries(frame.levels ?? {})
        .filter(([, level]) => level <= SPEAKING_DBOV).map(([id]) => key(id)));
      setAudible();
    }
    else if (frame.type === 'error') showError(frame);
  },
  onStatus(status, info = {}) {
    const conn = $('#connection-status');
    conn.dataset.state = status;
    conn.textContent = status === 'reconnecting' ? t('conn.reconnecting') : '';
    if (status === 'closed') ended(info);
  },
};

function ended({ code, lostSeat }) {
  media?.stop();
  media = null;
  store.del(SEAT_KEY);
  let reason = 'error';
  if (lostSeat) reason = 'seat-lost';
  else if (code === CLOSE.ENDED) reason = 'ended';
  else if (code === CLOSE.LEFT) reason = 'left';
  else if (code === CLOSE.FORBIDDEN) reason = lastScreen === 'room' ? 'removed' : (lastScreen === 'lobby' ? 'declined' : 'refused');
  else if (code === CLOSE.BAD_TOKEN) reason = 'invalid';
  else if (code === CLOSE.NO_CIRCLE) reason = 'no-circle';
  else if (code === CLOSE.FULL) reason = 'full';
  if (reason === 'left') { location.replace(config.exit_url || '/bye'); return; }
  if (reason !== 'seat-lost') store.del(TOKEN_KEY);
  showEnded(reason);
}

const ENDED_KEYS = {
  'seat-lost': 'ended.seat_lost', ended: 'ended.ended', removed: 'ended.removed', declined: 'ended.declined',
  refused: 'ended.refused', invalid: 'ended.invalid', 'no-circle': 'ended.no_circle', full: 'ended.full',
  error: 'ended.error', 'no-token': 'ended.no_token',
};

function showEnded(reason) {
  const status = $('#ended-status');
  status.dataset.reason = reason;
  status.textContent = t(ENDED_KEYS[reason] ?? 'ended.error');
  $('#rejoin').hidden = reason !== 'seat-lost';
  showScreen('ended');
}

function connect(token, resumeSecret) {
  const seat = { circle: circleId, token, name: joined.name, listenOnly: joined.listenOnly, resume: resumeSecret ?? null };
  session = new Session({
    hello: { token, name: joined.name, listen_only: joined.listenOnly },
    callbacks,
    storage: {
      load: () => seat.resume,
      save(secret) { if (typeof secret === 'string') { seat.resume = secret; store.set(SEAT_KEY, seat); } },
      clear() { seat.resume = null; store.del(SEAT_KEY); },
    },
  });
  session.open();
}

function bindRoomControls() {
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
  $('#open-note').addEventListener('click', () => { $('#help-panel').hidden = true; togglePanel('#note-panel'); });
  $('#open-help').addEventListener('click', () => togglePanel('#help-panel'));
  for (const b of document.querySelectorAll('[data-close]')) {
    b.addEventListener('click', () => { b.closest('.panel').hidden = true; });
  }
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
    const token = store.get(TOKEN_KEY)?.token;
    if (!token) { showEnded('invalid'); return; }
    state.version = null;
    $('#rejoin').hidden = true;
    $('#ended-status').dataset.reason = '';
    $('#ended-status').textContent = t('conn.connecting');
    if (!joined.listenOnly) joined.stream = await requestMicrophone().catch(() => null);
    connect(token, null);
  });
  document.addEventListener('lk:language', () => {
    document.title = t('app.neutral_title');
    const status = $('#ended-status');
    if (status.dataset.reason) status.textContent = t(ENDED_KEYS[status.dataset.reason] ?? 'ended.error');
    render();
  });
  setInterval(() => { if (lastScreen === 'room') renderTimer(state); }, 500);
}

function togglePanel(sel) {
  const panel = $(sel);
  panel.hidden = !panel.hidden;
  if (!panel.hidden) {
    // Show the panel from its title (focusing its first control alone scrolled past the help lines).
    panel.scrollIntoView({ block: 'start' });
    panel.querySelector('textarea, input, button')?.focus({ preventScroll: true });
  }
}

/**
 * The circle's language from the invite token's `lng` claim, read unverified: only a hint, so the
 * join screen speaks the circle's language at once and one catalog is fetched, not both.
 */
function languageHint(token) {
  try {
    const b64 = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), '=')));
    return typeof claims.lng === 'string' ? claims.lng : null;
  } catch { return null; }
}

async function main() {
  const token = readToken();
  const [cfg] = await Promise.all([loadConfig(), initI18n(token ? (languageHint(token) ?? 'id') : 'id')]);
  config = cfg;
  document.title = t('app.neutral_title');
  bindLanguageSwitch($('#lang-switch'));
  renderHelplines($('#helplines'), config.helplines);
  ensureSlots(config.slots);
  installQuietLeave($('#leave-quietly'), () => ({
    session, media, exitUrl: config.exit_url, needSupport: $('#leave-need-support').checked,
  }));
  bindRoomControls();

  if (!token) { showEnded('no-token'); return; }
  const saved = store.get(SEAT_KEY);
  if (saved?.circle === circleId && saved.token === token && saved.resume) {
    // A reload or a return within the grace period: resume the seat, no new join.
    $('#join-form').hidden = true;
    const stream = saved.listenOnly ? null : await requestMicrophone().catch(() => null);
    joined = { name: saved.name, listenOnly: saved.listenOnly, stream };
    connect(token, saved.resume);
    return;
  }
  joined = await runJoin();
  connect(token, null);
}

main();
