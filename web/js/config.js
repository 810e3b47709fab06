// /client-config (ICE servers, help lines, exit page, slot count) and the help-line list.
import { currentLanguage, t } from './i18n.js';

const DEFAULTS = { ice_servers: [], helplines: [], exit_url: '/bye', slots: 3 };

export async function loadConfig() {
  try {
    const res = await fetch('/client-config', { credentials: 'same-origin', cache: 'no-store' });
    if (!res.ok) return { ...DEFAULTS };
    const cfg = await res.json();
    return {
      ice_servers: Array.isArray(cfg.ice_servers) ? cfg.ice_servers : DEFAULTS.ice_servers,
      helplines: Array.isArray(cfg.helplines) ? cfg.helplines : DEFAULTS.helplines,
      exit_url: typeof cfg.exit_url === 'string' && cfg.exit_url.startsWith('/') ? cfg.exit_url : DEFAULTS.exit_url,
      slots: Number.isInteger(cfg.slots) && cfg.slots > 0 && cfg.slots <= 8 ? cfg.slots : DEFAULTS.slots,
    };
  } catch {
    return { ...DEFAULTS };
  }
}

/** A contact that looks like a phone number becomes a tel: link (one tap to call). */
function contactLink(contact) {
  const text = String(contact ?? '');
  if (/^\+?[\d\s-]{3,}$/.test(text)) {
    const a = document.createElement('a');
    a.href = `tel:${text.replace(/[\s-]/g, '')}`;
    a.textContent = text;
    return a;
  }
  if (/^https:\/\//.test(text)) {
    const a = document.createElement('a');
    a.href = text;
    a.rel = 'noopener noreferrer';
    a.target = '_blank';
    a.textContent = text;
    return a;
  }
  return document.createTextNode(text);
}

/** "Source · checked 2025-08-07": the page that confirms the line (linked only if https). */
function sourceLine(h) {
  const small = document.createElement('small');
  const source = String(h.source ?? '');
  if (/^https:\/\//.test(source)) {
    const a = document.createElement('a');
    a.href = source;
    a.rel = 'noopener noreferrer';
    a.target = '_blank';
    a.textContent = t('help.source');
    small.append(a);
  }
  if (h.checked) {
    if (small.firstChild) small.append(' · ');
    small.append(t('help.checked', { date: String(h.checked) }));
  }
  return small.firstChild ? small : null;
}

export function renderHelplines(list, helplines) {
  const draw = () => {
    if (!helplines.length) {
      const li = document.createElement('li');
      li.textContent = t('help.none');
      list.replaceChildren(li);
      return;
    }
    list.replaceChildren(...helplines.map((h) => {
      const li = document.createElement('li');
      const name = document.createElement('strong');
      name.textContent = h.name ?? '';
      li.append(name, ' ', contactLink(h.contact));
      const note = h.note?.[currentLanguage()] ?? h.note?.id ?? '';
      if (h.hours || note) {
        const small = document.createElement('small');
        small.textContent = [h.hours, note].filter(Boolean).join(' · ');
        li.append(document.createElement('br'), small);
      }
      const source = sourceLine(h);
      if (source) li.append(document.createElement('br'), source);
      return li;
    }));
  };
  draw();
  document.addEventListener('lk:language', draw);
}
