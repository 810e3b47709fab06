// /organizer (F14): the key (this tab only), new circles and their links, live counts, and each
// circle's invites: mint a named one (a moderator's is always personal), see who holds a place
// through each (a count), revoke one (its holders are put out with 4403, F10).
import { initI18n, bindLanguageSwitch, t } from './i18n.js';

const $ = (sel) => document.querySelector(sel);
const KEY = 'lk.org_key';
const REFRESH_MS = 5000;
let refreshTimer = null;
let circles = [];
let invites = [];            // of the circle whose invites are open (#invites-panel)

const apiKey = () => { try { return sessionStorage.getItem(KEY); } catch { return null; } };

function setError(key) { $('#org-error').textContent = key ? t(key) : ''; $('#org-error').dataset.key = key ?? ''; }
function setStatus(key) { $('#org-status').textContent = key ? t(key) : ''; $('#org-status').dataset.key = key ?? ''; }

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${apiKey()}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
    cache: 'no-store',
    credentials: 'omit',
  });
  if (res.status === 401) { forgetKey(); setError('org.error_key'); throw new Error('unauthorized'); }
  if (!res.ok) {
    let detail = {};
    try { detail = await res.json(); } catch { /* not JSON */ }
    const err = new Error(detail.message || res.statusText);
    err.status = res.status;
    throw err;
  }
  return res.status === 204 ? null : res.json();
}

// Counts come under `counts` (top-level `lobby` is the lobby on/off setting); fall back to flat fields.
const pick = (c, ...names) => {
  for (const n of names) if (c.counts?.[n] !== undefined) return c.counts[n];
  for (const n of names) if (c[n] !== undefined && typeof c[n] !== 'boolean') return c[n];
  return undefined;
};
const flag = (c, name) => (typeof c[name] === 'boolean' ? c[name] : undefined);

function elapsed(c) {
  let s = pick(c, 'running_seconds', 'time_running', 'elapsed', 'uptime_seconds');
  const started = pick(c, 'started_at', 'created_at');
  if (s === undefined && typeof started === 'number') s = (Date.now() - (started < 1e12 ? started * 1000 : started)) / 1000;
  if (typeof s !== 'number') return '–';
  const m = Math.floor(s / 60);
  return m >= 60 ? `${Math.floor(m / 60)}j ${m % 60}m` : `${m}m`;
}

function cell(text) { const td = document.createElement('td'); td.textContent = text ?? '–'; return td; }

function actionButton(action, labelKey, extra = {}) {
  const b = document.createElement('button');
  b.type = 'button';
  b.dataset.action = action;
  Object.assign(b.dataset, extra);
  b.textContent = t(labelKey);
  return b;
}

function renderCircles() {
  const body = $('#circles');
  body.replaceChildren(...circles.map((c) => {
    const tr = document.createElement('tr');
    tr.dataset.circleId = String(c.id);
    const present = flag(c, 'moderator_present');
    const mode = c.floor_mode;
    tr.append(
      cell(c.title ?? c.id),
      cell(pick(c, 'members', 'member_count')),
      cell(pick(c, 'listeners', 'listener_count')),
      cell(pick(c, 'lobby', 'lobby_waiting', 'waiting')),
      cell(present === undefined ? '–' : t(present ? 'org.present_yes' : 'org.present_no')),
      cell(mode ? t(`mode.${mode}`) : '–'),
      cell(elapsed(c)),
    );
    if (present === false) tr.dataset.moderatorMissing = 'true';
    const actions = document.createElement('td');
    actions.append(actionButton('invites', 'org.invites'), ' ', actionButton('end-circle', 'org.end'));
    tr.append(actions);
    return tr;
  }));
  $('#circles-empty').hidden = circles.length > 0;
}

async function refresh() {
  try {
    const data = await api('GET', '/api/circles');
    circles = Array.isArray(data) ? data : (data?.circles ?? []);
    renderCircles();
  } catch (err) {
    if (err.message !== 'unauthorized') setError('org.error_load');
  }
  if (!$('#invites-panel').hidden) loadInvites();
}

// ---- invites of one circle ----
const invitesCircle = () => $('#invites-panel').dataset.circleId;

function renderInvites() {
  const id = invitesCircle();
  const circle = circles.find((c) => String(c.id) === id);
  $('#invites-title').textContent = t('org.invites_title', { title: circle?.title ?? id });
  $('#invites').replaceChildren(...invites.map((inv) => {
    const li = document.createElement('li');
    li.dataset.inviteId = inv.id;
    li.dataset.role = inv.role;
    li.dataset.revoked = String(!!inv.revoked);
    li.dataset.holders = String(inv.holders ?? 0);
    const label = document.createElement('strong');
    label.textContent = inv.label || t('org.no_label');
    const tags = document.createElement('span');
    tags.className = 'hint';
    tags.textContent = [
      t(`org.role_${inv.role}`),
      t(inv.personal ? 'org.personal' : 'org.shared'),
      inv.holders ? t('org.holders', { count: inv.holders }) : t('org.holders_none'),
      inv.revoked ? t('org.revoked') : null,
    ].filter(Boolean).join(' · ');
    const who = document.createElement('span');
    who.className = 'who';
    who.append(label, document.createElement('br'), tags);
    li.append(who);
    if (!inv.revoked) li.append(actionButton('revoke', 'org.revoke'));
    return li;
  }));
  $('#invites-empty').hidden = invites.length > 0;
}

async function loadInvites() {
  const id = invitesCircle();
  try {
    const data = await api('GET', `/api/circles/${encodeURIComponent(id)}/invites`);
    if (invitesCircle() !== id) return;       // another circle was opened meanwhile
    invites = data?.invites ?? [];
    renderInvites();
  } catch (err) {
    if (err.status === 404) { closeInvites(); return; }   // the circle has ended
    if (err.message !== 'unauthorized') setError('org.error_invites');
  }
}

function openInvites(id) {
  const panel = $('#invites-panel');
  if (panel.dataset.circleId !== id) {
    invites = [];
    $('#invite-link').hidden = true;
    $('#new-invite').reset();
    showPersonal();
  }
  panel.dataset.circleId = id;
  panel.hidden = false;
  renderInvites();
  loadInvites();
  panel.scrollIntoView({ block: 'start' });
}

function closeInvites() {
  const panel = $('#invites-panel');
  panel.hidden = true;
  delete panel.dataset.circleId;
  $('#invite-link').hidden = true;
  $('#invite-link input').value = '';
  invites = [];
}

// A moderator's invite is always for one person: the choice is offered for the other roles only.
function showPersonal() {
  $('#i-personal').hidden = $('#new-invite').elements.role.value === 'moderator';
}

function start() {
  $('#org-key').hidden = true;
  $('#org-main').hidden = false;
  refresh();
  clearInterval(refreshTimer);
  refreshTimer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
}

function forgetKey() {
  try { sessionStorage.removeItem(KEY); } catch { /* private mode */ }
  clearInterval(refreshTimer);
  closeInvites();
  $('#org-main').hidden = true;
  $('#org-key').hidden = false;
}

function showLinks(links) {
  for (const role of ['moderator', 'member', 'guest']) {
    const box = document.querySelector(`#new-links [data-link=${role}]`);
    box.hidden = !links?.[role];
    box.querySelector('input').value = links?.[role] ?? '';
  }
  $('#new-links').hidden = false;
}

async function copyFrom(input) {
  try { await navigator.clipboard.writeText(input.value); } catch {
    input.select();
    document.execCommand?.('copy');
  }
  setStatus('org.copied');
}

function bind() {
  $('#org-key').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = ev.target.elements.key.value.trim();
    if (!value) return;
    try { sessionStorage.setItem(KEY, value); } catch { /* private mode: kept in memory only */ }
    ev.target.reset();
    setError('');
    start();
  });
  $('#forget-key').addEventListener('click', forgetKey);
  $('#new-circle').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    const body = {
      title: f.title.value.trim(),
      language: f.language.value,
      capacity: Number(f.capacity.value),
      turn_seconds: Number(f.turn_seconds.value),
      floor_mode: f.floor_mode.value,
      lobby: f.lobby.checked,
    };
    if (f.topic.value.trim()) body.topic = f.topic.value.trim();
    if (!body.title) { setError('org.error_title'); return; }
    try {
      setError('');
      const created = await api('POST', '/api/circles', body);
      showLinks(created.links);
      setStatus('org.created');
      ev.target.reset();
      refresh();
    } catch (err) {
      if (err.message !== 'unauthorized') setError(err.status === 422 || err.status === 400 ? 'org.error_invalid' : 'org.error_create');
    }
  });
  for (const box of [$('#new-links'), $('#invite-link')]) {
    box.addEventListener('click', (ev) => {
      const b = ev.target.closest('[data-copy]');
      if (b) copyFrom(b.closest('.row').querySelector('input'));
    });
  }
  $('#new-invite').elements.role.addEventListener('change', showPersonal);
  $('#new-invite').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    const body = { role: f.role.value, label: f.label.value.trim() };
    if (body.role !== 'moderator') body.personal = f.personal.checked;
    try {
      setError('');
      const { link } = await api('POST', `/api/circles/${encodeURIComponent(invitesCircle())}/invites`, body);
      $('#invite-link input').value = link;
      $('#invite-link').hidden = false;
      f.label.value = '';
      loadInvites();
    } catch (err) {
      if (err.message !== 'unauthorized') setError(err.status === 404 ? 'org.error_invites' : 'org.error_action');
    }
  });
  $('#invites').addEventListener('click', async (ev) => {
    const b = ev.target.closest('[data-action=revoke]');
    if (!b) return;
    const invite = b.closest('[data-invite-id]').dataset.inviteId;
    if (!window.confirm(t('org.confirm_revoke'))) return;
    try {
      setError('');
      await api('DELETE', `/api/circles/${encodeURIComponent(invitesCircle())}/invites/${encodeURIComponent(invite)}`);
      setStatus('org.revoked_done');
      loadInvites();
    } catch (err) {
      if (err.message !== 'unauthorized') setError('org.error_action');
    }
  });
  $('#close-invites').addEventListener('click', closeInvites);
  $('#circles').addEventListener('click', async (ev) => {
    const b = ev.target.closest('[data-action]');
    if (!b) return;
    const id = b.closest('[data-circle-id]').dataset.circleId;
    try {
      if (b.dataset.action === 'end-circle') {
        if (!window.confirm(t('org.confirm_end'))) return;
        await api('DELETE', `/api/circles/${encodeURIComponent(id)}`);
        setStatus('org.ended');
        refresh();
      } else if (b.dataset.action === 'invites') {
        openInvites(id);
      }
    } catch (err) {
      if (err.message !== 'unauthorized') setError('org.error_action');
    }
  });
  document.addEventListener('lk:language', () => {
    renderCircles();
    if (!$('#invites-panel').hidden) renderInvites();
    for (const el of [$('#org-error'), $('#org-status')]) if (el.dataset.key) el.textContent = t(el.dataset.key);
  });
}

/** `lingkar serve` prints /organizer#key=…: keep the key for this tab, then drop it from the address bar. */
function keyFromFragment() {
  const key = new URLSearchParams(location.hash.slice(1)).get('key');
  if (!key) return;
  try { sessionStorage.setItem(KEY, key); } catch { /* private mode */ }
  history.replaceState(null, '', location.pathname);
}

keyFromFragment();
await initI18n('id');
bindLanguageSwitch($('#lang-switch'));
bind();
if (apiKey()) start();
