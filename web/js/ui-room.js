// The room as a member sees it: roster seats, floor, timer, prompts, own controls.
import { t } from './i18n.js';
import {
  key, self, isMe, isModerator, holdsFloor, nameOf, serverNow, airtimeOf,
} from './state.js';

const $ = (sel) => document.querySelector(sel);

export const ERROR_KEYS = {
  bad_frame: 'error.bad_frame', unknown_type: 'error.unknown_type', forbidden: 'error.forbidden',
  not_allowed: 'error.not_allowed', no_such_member: 'error.no_such_member',
  rate_limited: 'error.rate_limited', too_long: 'error.too_long', conflict: 'error.conflict',
  unavailable: 'error.unavailable', offline: 'error.offline', timeout: 'error.timeout', media: 'error.media',
};

export function showError(err) {
  const el = $('#room-error');
  el.textContent = err ? t(ERROR_KEYS[err.code] ?? 'error.generic') : '';
  if (err) setTimeout(() => { if (el.textContent) el.textContent = ''; }, 6000);
}

export function announce(text) {
  const el = $('#announce');
  el.textContent = '';
  // A fresh node each time so screen readers read a repeat too.
  requestAnimationFrame(() => { el.textContent = text; });
}

export function formatClock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

function setFlag(el, name, on) { el.dataset[name] = on ? 'true' : 'false'; }

/** One roster entry per admitted member; entries are kept (not rebuilt) so focus survives. */
function rosterEntry(list, m) {
  let li = list.querySelector(`:scope > li[data-member-id="${CSS.escape(key(m.id))}"]`);
  if (!li) {
    li = document.createElement('li');
    li.dataset.memberId = key(m.id);
    li.innerHTML = '<span class="avatar" aria-hidden="true"></span><span class="who"><span class="name"></span> <span class="tags"></span></span>';
    list.append(li);
  }
  return li;
}

function tagsFor(state, m) {
  const tags = [];
  if (isMe(state, m.id)) tags.push(t('roster.you'));
  if (m.role === 'moderator') tags.push(t('roster.moderator'));
  if (m.role === 'guest') tags.push(t('roster.guest'));
  if (m.listen_only) tags.push(t('roster.listening'));
  else if (m.muted) tags.push(t('roster.muted'));
  if (m.hand) tags.push(t('roster.hand'));
  if (m.connected === false) tags.push(t('roster.away'));
  return tags.join(' · ');
}

export function renderRoster(state, { makeActions, updateActions, audible }) {
  const list = $('#roster');
  const mod = isModerator(state);
  list.classList.toggle('circle', !mod);
  list.classList.toggle('list', mod);
  const members = [...state.members.values()].sort((a, b) => (a.seat ?? 0) - (b.seat ?? 0));
  const keep = new Set(members.map((m) => key(m.id)));
  for (const li of list.querySelectorAll(':scope > li')) if (!keep.has(li.dataset.memberId)) li.remove();
  const n = members.length;
  members.forEach((m, i) => {
    const li = rosterEntry(list, m);
    if (mod && makeActions && !li.querySelector('.actions')) makeActions(li, m);
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] ?? null);
    li.dataset.role = m.role;
    setFlag(li, 'speaking', state.floor.holder != null && key(state.floor.holder) === key(m.id));
    setFlag(li, 'muted', !!m.muted);
    setFlag(li, 'hand', !!m.hand);
    setFlag(li, 'connected', m.connected !== false);
    setFlag(li, 'me', isMe(state, m.id));
    setFlag(li, 'audible', audible.has(key(m.id)));
    li.style.setProperty('--angle', `${(360 * i) / Math.max(n, 1)}deg`);
    li.querySelector('.avatar').textContent = [...(m.name || '?')][0].toUpperCase();
    li.querySelector('.name').textContent = m.name;
    li.querySelector('.tags').textContent = tagsFor(state, m);
    if (mod && updateActions) updateActions(li, m);
  });
  renderSeatMap(state, members, audible);
}

/** The moderator's roster is a list (its controls need room); this small circle keeps the picture. */
function renderSeatMap(state, members, audible) {
  const map = $('#seat-map');
  map.hidden = !isModerator(state);
  if (map.hidden) return;
  map.replaceChildren(...members.map((m, i) => {
    const li = document.createElement('li');
    li.dataset.seatId = key(m.id);
    setFlag(li, 'speaking', state.floor.holder != null && key(state.floor.holder) === key(m.id));
    setFlag(li, 'audible', audible.has(key(m.id)));
    li.style.setProperty('--angle', `${(360 * i) / Math.max(members.length, 1)}deg`);
    li.textContent = [...(m.name || '?')][0].toUpperCase();
    return li;
  }));
}

function floorText(state) {
  const holder = state.floor.holder;
  if (holder != null) return isMe(state, holder) ? t('floor.you') : t('floor.holder', { name: nameOf(state, holder) });
  const mode = state.circle?.floor_mode;
  if (mode === 'open') return t('floor.open');
  if (mode === 'round') return t('floor.none_round');
  return t('floor.none_hands');
}

export function renderFloor(state) {
  $('#floor-status').textContent = floorText(state);
  $('#waiting-moderator').hidden = state.moderator_present !== false;
  const mine = holdsFloor(state);
  $('#holder-actions').hidden = !mine;
  $('#pass').hidden = !(mine && state.circle?.floor_mode === 'round');
  renderQueue(state);
  renderTimer(state);
}

function renderQueue(state) {
  const queue = $('#queue');
  queue.replaceChildren(...state.queue.map((id) => {
    const li = document.createElement('li');
    li.dataset.memberId = key(id);
    li.textContent = isMe(state, id) ? `${nameOf(state, id)} (${t('roster.you')})` : nameOf(state, id);
    return li;
  }));
  $('#queue-empty').hidden = state.queue.length > 0;
  $('#queue-box').hidden = state.circle?.floor_mode !== 'hands';
}

/** Time left from floor.deadline on the server's clock; shown to the holder and moderators (F5). */
export function renderTimer(state) {
  const el = $('#turn-timer');
  const { deadline } = state.floor;
  const show = deadline != null && (holdsFloor(state) || isModerator(state));
  el.hidden = !show;
  if (!show) { el.dataset.warning = 'false'; return; }
  const left = (deadline - serverNow(state)) / 1000;
  el.textContent = left > 0 ? t('timer.left', { time: formatClock(left) }) : t('timer.over');
  setFlag(el, 'warning', state.turnWarning || left <= 30);
  if (isModerator(state)) {
    for (const cell of document.querySelectorAll('#roster [data-airtime]')) {
      cell.textContent = formatClock(airtimeOf(state, cell.dataset.airtime));
    }
  }
}

export function renderControls(state) {
  const me = self(state);
  const mod = isModerator(state);
  const muteBtn = $('#mute-self');
  muteBtn.hidden = !me;
  if (me) {
    const listening = !!me.listen_only;
    muteBtn.disabled = listening;
    muteBtn.setAttribute('aria-pressed', String(!!me.muted || listening));
    muteBtn.textContent = listening ? t('room.listening_only') : t(me.muted ? 'room.unmute' : 'room.mute');
  }
  const hand = $('#raise-hand');
  hand.hidden = !me || mod;
  if (me && !mod) {
    hand.disabled = state.circle?.floor_mode !== 'hands' || holdsFloor(state);
    hand.setAttribute('aria-pressed', String(!!me.hand));
    hand.textContent = t(me.hand ? 'room.lower_hand' : 'room.raise_hand');
  }
  $('#open-note').hidden = !me || mod;
}

/** The consent prompt (F6): the floor holder, or an asked member, unmutes themself — or not. */
export function renderPrompt(state, prompt) {
  const box = $('#turn-prompt');
  const me = self(state);
  const show = !!prompt && !!me && !!me.muted;
  box.hidden = !show;
  if (!show) return;
  box.dataset.kind = prompt;
  const listening = !!me.listen_only;
  $('#prompt-unmute').hidden = listening;
  let text = prompt === 'floor' ? 'prompt.floor' : 'prompt.asked';
  if (listening) text = prompt === 'floor' ? 'prompt.floor_listening' : 'prompt.asked_listening';
  $('#turn-prompt-text').textContent = t(text);
}

/** Ask before leaving, removing someone or ending the circle; resolves true only on "yes". */
export function confirmStep(textKey, vars) {
  const dialog = $('#confirm-dialog');
  $('#confirm-text').textContent = t(textKey, vars);
  if (typeof dialog.showModal !== 'function') return Promise.resolve(window.confirm(t(textKey, vars)));
  return new Promise((resolve) => {
    const done = (answer) => {
      $('#confirm-ok').onclick = null;
      $('#confirm-cancel').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $('#confirm-ok').onclick = () => done(true);
    $('#confirm-cancel').onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
    $('#confirm-cancel').focus();
  });
}
