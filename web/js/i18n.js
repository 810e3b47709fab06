// Two languages (F15): catalogs in /static/i18n/{id,en}.json with identical keys. A page with
// many strings of its own keeps them apart, <html data-i18n-parts="organizer"> fetching
// /static/i18n/organizer.{id,en}.json beside the shared catalog: a member's phone never loads them.
// HTML uses data-i18n (text), data-i18n-placeholder, data-i18n-aria-label, data-i18n-title.

export const LANGUAGES = ['id', 'en'];
const PREF_KEY = 'lk.lang';
const catalogs = {};
let parts = [];
let lang = 'id';
let chosenByUser = false;

async function fetchJson(url) {
  const res = await fetch(url, { credentials: 'same-origin' });
  return res.ok ? res.json() : {};
}

async function fetchCatalog(code) {
  if (!catalogs[code]) {
    const urls = [`/static/i18n/${code}.json`, ...parts.map((part) => `/static/i18n/${part}.${code}.json`)];
    catalogs[code] = Object.assign({}, ...(await Promise.all(urls.map(fetchJson))));
  }
  return catalogs[code];
}

function readPref() {
  try { return sessionStorage.getItem(PREF_KEY); } catch { return null; }
}

/** Load the member's chosen language (this tab only), else `fallback`, else Indonesian. */
export async function initI18n(fallback = 'id') {
  parts = (document.documentElement.dataset.i18nParts ?? '').split(/\s+/).filter(Boolean);
  const pref = readPref();
  chosenByUser = LANGUAGES.includes(pref);
  await setLanguage(chosenByUser ? pref : (LANGUAGES.includes(fallback) ? fallback : 'id'));
}

export async function setLanguage(code, byUser = false) {
  if (!LANGUAGES.includes(code)) return;
  await fetchCatalog(code);
  lang = code;
  if (byUser) {
    chosenByUser = true;
    try { sessionStorage.setItem(PREF_KEY, code); } catch { /* private mode */ }
  }
  document.documentElement.lang = code;
  applyI18n();
  document.dispatchEvent(new CustomEvent('lk:language', { detail: code }));
}

/** The circle's language becomes the default unless the member picked one. */
export async function suggestLanguage(code) {
  if (!chosenByUser && code !== lang) await setLanguage(code);
}

export function currentLanguage() { return lang; }

/** Translate `key`; `{name}` placeholders are filled from `vars`. */
export function t(key, vars) {
  const text = catalogs[lang]?.[key] ?? catalogs.id?.[key] ?? key;
  if (!vars) return text;
  return text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
}

export function applyI18n(root = document) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll('[data-i18n-aria-label]')) el.setAttribute('aria-label', t(el.dataset.i18nAriaLabel));
  for (const el of root.querySelectorAll('[data-i18n-title]')) el.title = t(el.dataset.i18nTitle);
}

/** A button that flips between the two languages; its label names the other language. */
export function bindLanguageSwitch(button) {
  if (!button) return;
  const label = () => { button.textContent = t('lang.switch'); };
  label();
  document.addEventListener('lk:language', label);
  button.addEventListener('click', () => setLanguage(lang === 'id' ? 'en' : 'id', true));
}
