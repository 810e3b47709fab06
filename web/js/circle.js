// /c/{circle}: the join screen, then the room (./room.js). The join form waits only for this
// module and its imports (preloaded by circle.html). Until then it shows a disabled "Memuat…"
// button alone, and its method is "dialog": no name is ever submitted into a URL (issue 16).
// The room's modules load while the member fills the form.
import { initI18n, bindLanguageSwitch, t } from './i18n.js';
import { loadConfig, renderHelplines } from './config.js';
import { installQuietLeave } from './leave.js';
import { runJoin } from './ui-join.js';

const $ = (sel) => document.querySelector(sel);
const circleId = decodeURIComponent(location.pathname.split('/').filter(Boolean).pop() ?? '');
const SEAT_KEY = 'lk.seat';
const TOKEN_KEY = 'lk.token';

// All that ./room.js imports, however deep, preloaded at once (tests/test_page_weight.py checks).
const ROOM_MODULES = [
  ...['room', 'protocol', 'state', 'media', 'ui-room', 'msgpack', 'msgpack-define'].map((f) => `/static/js/${f}.js`),
  '/vendor/@msgpack/msgpack/dist.umd/msgpack.min.js',
];
const MODERATOR_MODULES = ['/static/js/ui-mod.js'];

let config = null;
let room = null;              // the room module once loaded
let roomLoading = null;

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

/**
 * The invite token's claims, read unverified, as hints: `lng` (the circle's language: the join
 * screen speaks it at once, one catalog is fetched) and whether `role` is moderator.
 */
function tokenHints(token) {
  try {
    const b64 = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), '=')));
    return {
      language: typeof claims.lng === 'string' ? claims.lng : null,
      moderator: claims.role === 'moderator',
    };
  } catch { return { language: null, moderator: false }; }
}

// ---- screens ----
const ENDED_KEYS = {
  'seat-lost': 'ended.seat_lost', ended: 'ended.ended', removed: 'ended.removed', declined: 'ended.declined',
  refused: 'ended.refused', invalid: 'ended.invalid', 'no-circle': 'ended.no_circle', full: 'ended.full',
  error: 'ended.error', 'no-token': 'ended.no_token', left: 'ended.left',
};

const screens = {
  current: 'join',
  show(name) {
    this.current = name;
    document.body.dataset.screen = name;
    for (const s of document.querySelectorAll('.screen')) s.hidden = s.id !== `screen-${name}`;
    if (name !== 'room') { $('#note-panel').hidden = true; }
  },
  ended(reason) {
    const status = $('#ended-status');
    status.dataset.reason = reason;
    status.textContent = t(ENDED_KEYS[reason] ?? 'ended.error');
    $('#rejoin').hidden = reason !== 'seat-lost';
    this.show('ended');
  },
};

function togglePanel(sel) {
  const panel = $(sel);
  panel.hidden = !panel.hidden;
  if (!panel.hidden) {
    // Show the panel from its title (focusing its first control alone scrolled past the help lines).
    panel.scrollIntoView({ block: 'start' });
    panel.querySelector('textarea, input, button')?.focus({ preventScroll: true });
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

/** Preload the room's modules, then load it (once; again after a failure). */
function loadRoom(moderator) {
  if (roomLoading) return roomLoading;
  for (const href of [...ROOM_MODULES, ...(moderator ? MODERATOR_MODULES : [])]) {
    if (document.querySelector(`link[rel=modulepreload][href="${href}"]`)) continue;
    const link = document.createElement('link');
    link.rel = 'modulepreload';
    link.href = href;
    document.head.append(link);
  }
  roomLoading = import('./room.js').then((mod) => {
    mod.startRoom({
      circleId, config, store, keys: { seat: SEAT_KEY, token: TOKEN_KEY }, screens, togglePanel,
    });
    room = mod;
    return mod;
  }, (err) => { roomLoading = null; throw err; });
  return roomLoading;
}

/** The join form works from here on. */
function ready() {
  const form = $('#join-form');
  const button = $('#join');
  button.dataset.i18n = 'join.enter';
  button.textContent = t('join.enter');
  button.disabled = false;
  form.removeAttribute('aria-busy');
  document.body.dataset.ready = 'true';
}

async function main() {
  // Never a native submission (method="dialog" already sends nothing).
  $('#join-form').addEventListener('submit', (ev) => ev.preventDefault());
  // The quiet way out works as soon as this module runs, before the configuration is here.
  installQuietLeave($('#leave-quietly'), () => ({
    ...(room ? room.current() : { session: null, media: null }),
    exitUrl: config?.exit_url, needSupport: $('#leave-need-support').checked,
  }));
  const token = readToken();
  const hints = token ? tokenHints(token) : { language: null, moderator: false };
  const [cfg] = await Promise.all([loadConfig(), initI18n(hints.language ?? 'id')]);
  config = cfg;
  document.title = t('app.neutral_title');
  bindLanguageSwitch($('#lang-switch'));
  renderHelplines($('#helplines'), config.helplines);
  ensureSlots(config.slots);
  $('#open-help').addEventListener('click', () => togglePanel('#help-panel'));
  for (const b of document.querySelectorAll('[data-close]')) {
    b.addEventListener('click', () => { b.closest('.panel').hidden = true; });
  }
  document.addEventListener('lk:language', () => {
    document.title = t('app.neutral_title');
    const status = $('#ended-status');
    if (status.dataset.reason) status.textContent = t(ENDED_KEYS[status.dataset.reason] ?? 'ended.error');
  });

  if (!token) { ready(); screens.ended('no-token'); return; }
  const saved = store.get(SEAT_KEY);
  if (saved?.circle === circleId && saved.token === token && saved.resume) {
    // A reload or a return within the grace period: resume the seat, no new join.
    $('#join-form').hidden = true;
    ready();
    const [mod, stream] = await Promise.all([
      loadRoom(hints.moderator),
      saved.listenOnly ? null : (async () => (await import('./media.js')).requestMicrophone())().catch(() => null),
    ]);
    mod.join(token, { name: saved.name, listenOnly: saved.listenOnly, stream }, saved.resume);
    return;
  }
  const entering = runJoin({ loadRoom: () => loadRoom(hints.moderator) });
  ready();
  loadRoom(hints.moderator).catch(() => { /* tried again when the member presses Join */ });
  const { who, room: mod } = await entering;
  mod.join(token, who);
}

main();
