// Static pages (/, /help): language and, where there is a list for them, the help lines.
import { initI18n, bindLanguageSwitch } from './i18n.js';
import { loadConfig, renderHelplines } from './config.js';

await initI18n('id');
bindLanguageSwitch(document.querySelector('#lang-switch'));
const list = document.querySelector('#helplines');
if (list) renderHelplines(list, (await loadConfig()).helplines);
