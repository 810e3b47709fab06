// The moderator's controls: per-member actions, lobby, circle-wide buttons, private notices.
import { t } from './i18n.js';
import { key, isModerator, isMe, nameOf } from './state.js';
import { confirmStep } from './ui-room.js';

const $ = (sel) => document.querySelector(sel);
const MAX_NOTICES = 40;
const EXTEND_SECONDS = 60;

const MEMBER_ACTIONS = [
  ['give-floor', 'mod.give_floor'],
  ['mute', 'mod.mute'],
  ['ask-unmute', 'mod.ask_unmute'],
  ['remove', 'mod.remove'],
];

function button(action, labelKey, name) {
  const b = document.createElement('button');
  b.type = 'button';
  b.dataset.action = action;
  b.dataset.labelKey = labelKey;
  b.textContent = t(labelKey);
  b.setAttribute('aria-label', `${t(labelKey)}: ${name}`);
  return b;
}

/** Builds and updates moderator controls. `send(type, fields)` returns a promise. */
export function moderatorUi({ getState, send }) {
  const memberId = (li) => getState().members.get(li.dataset.memberId)?.id ?? li.dataset.memberId;
  const lobbyId = (li) => getState().lobby.get(li.dataset.memberId)?.id ?? li.dataset.memberId;

  function makeActions(li, m) {
    const box = document.createElement('span');
    box.className = 'actions';
    const air = document.createElement('span');
    air.className = 'airtime';
    air.dataset.airtime = key(m.id);
    air.title = t('mod.airtime');
    box.append(air, ...MEMBER_ACTIONS.map(([a, k]) => button(a, k, m.name)));
    li.append(box);
  }

  // Buttons stay enabled: the server's rules decide, and its error is shown if it refuses.
  function updateActions(li, m) {
    const mine = isMe(getState(), m.id);
    for (const b of li.querySelectorAll('[data-action]')) {
      b.hidden = mine;
      b.textContent = t(b.dataset.labelKey);
      b.setAttribute('aria-label', `${t(b.dataset.labelKey)}: ${m.name}`);
    }
  }

  async function onRosterClick(ev) {
    const b = ev.target.closest('#roster [data-action]');
    if (!b) return;
    const li = b.closest('[data-member-id]');
    const id = memberId(li);
    const state = getState();
    switch (b.dataset.action) {
      case 'give-floor': return send('give_floor', { member_id: id });
      case 'mute': return send('mute', { member_id: id });
      case 'ask-unmute': return send('ask_unmute', { member_id: id });
      case 'remove':
        if (await confirmStep('confirm.remove', { name: nameOf(state, id) })) return send('remove', { member_id: id });
        return undefined;
      default: return undefined;
    }
  }

  function onLobbyClick(ev) {
    const b = ev.target.closest('#lobby-list [data-action]');
    if (!b) return;
    const id = lobbyId(b.closest('[data-member-id]'));
    if (b.dataset.action === 'admit') send('admit', { member_id: id });
    if (b.dataset.action === 'decline') send('decline', { member_id: id });
  }

  function renderLobby(state) {
    const list = $('#lobby-list');
    const entries = [...state.lobby.values()];
    const keep = new Set(entries.map((m) => key(m.id)));
    for (const li of list.querySelectorAll(':scope > li')) if (!keep.has(li.dataset.memberId)) li.remove();
    for (const m of entries) {
      let li = list.querySelector(`:scope > li[data-member-id="${CSS.escape(key(m.id))}"]`);
      if (!li) {
        li = document.createElement('li');
        li.dataset.memberId = key(m.id);
        const name = document.createElement('span');
        name.className = 'name';
        li.append(name, button('admit', 'mod.admit', m.name), button('decline', 'mod.decline', m.name));
        list.append(li);
      }
      li.querySelector('.name').textContent = m.role === 'guest' ? `${m.name} (${t('roster.guest')})` : m.name;
      for (const b of li.querySelectorAll('[data-action]')) b.textContent = t(b.dataset.labelKey);
    }
    $('#lobby-empty').hidden = entries.length > 0;
  }

  function render(state) {
    const mod = isModerator(state);
    $('#mod-panel').hidden = !mod;
    if (!mod) return;
    renderLobby(state);
    const locked = !!state.circle?.locked;
    const lock = $('#lock');
    lock.setAttribute('aria-pressed', String(locked));
    lock.textContent = t(locked ? 'mod.unlock' : 'mod.lock');
    const mode = state.circle?.floor_mode ?? 'hands';
    if ($('#floor-mode').value !== mode) $('#floor-mode').value = mode;
  }

  function addNotice(kind, text, urgent) {
    const li = document.createElement('li');
    li.dataset.kind = kind;
    if (urgent) li.dataset.urgent = 'true';
    const time = document.createElement('time');
    time.textContent = new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    li.append(time, ` ${text}`);
    const list = $('#notices');
    list.prepend(li);
    while (list.children.length > MAX_NOTICES) list.lastElementChild.remove();
  }

  $('#roster').addEventListener('click', onRosterClick);
  $('#lobby-list').addEventListener('click', onLobbyClick);
  $('#next').addEventListener('click', () => send('next'));
  $('#extend-turn').addEventListener('click', () => send('extend_turn', { seconds: EXTEND_SECONDS }));
  $('#end-turn').addEventListener('click', () => send('release_floor'));
  $('#mute-all').addEventListener('click', () => send('mute_all'));
  $('#lock').addEventListener('click', () => send(getState().circle?.locked ? 'unlock' : 'lock'));
  $('#end').addEventListener('click', async () => {
    if (await confirmStep('confirm.end')) send('end');
  });
  $('#floor-mode').addEventListener('change', (ev) => send('set_mode', { mode: ev.target.value }));

  return { makeActions, updateActions, render, addNotice };
}
