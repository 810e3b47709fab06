// The join form (F2): pseudonym, speak or listen only, mic check, pledge, reminders.
import { t } from './i18n.js';
import { requestMicrophone, watchLevel } from './media.js';

const $ = (sel) => document.querySelector(sel);
// Control characters are refused by the server; say so here first.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

export function validPseudonym(raw) {
  const name = raw.trim();
  if (!name) return { error: 'join.error_name_empty' };
  if ([...name].length > 32) return { error: 'join.error_name_long' };
  if (CONTROL.test(name)) return { error: 'join.error_name_chars' };
  return { name };
}

/**
 * Shows the join form; resolves once with {name, listenOnly, stream} when the member enters.
 * `stream` is the microphone (null when listening only, or when the mic was refused).
 */
export function runJoin() {
  const form = $('#join-form');
  const listenOnly = form.elements.listen_only;
  const micBox = $('#mic-box');
  const meter = $('#mic-meter');
  const micStatus = $('#mic-status');
  const error = $('#join-error');
  let stream = null;
  let stopMeter = () => {};

  const releaseMic = () => {
    stopMeter();
    stopMeter = () => {};
    for (const tr of stream?.getTracks() ?? []) tr.stop();
    stream = null;
    meter.hidden = true;
  };

  const showMicStatus = (key) => { micStatus.dataset.key = key; micStatus.textContent = key ? t(key) : ''; };
  document.addEventListener('lk:language', () => {
    if (micStatus.dataset.key) micStatus.textContent = t(micStatus.dataset.key);
    if (error.dataset.key) error.textContent = t(error.dataset.key);
  });

  async function openMic() {
    if (stream) return stream;
    try {
      stream = await requestMicrophone();
      meter.hidden = false;
      stopMeter = watchLevel(stream, (level) => { meter.value = level; });
      showMicStatus('join.mic_ok');
      return stream;
    } catch {
      showMicStatus('join.mic_refused');
      return null;
    }
  }

  listenOnly.addEventListener('change', () => {
    micBox.hidden = listenOnly.checked;
    if (listenOnly.checked) { releaseMic(); showMicStatus(''); }
  });
  $('#mic-check').addEventListener('click', () => { openMic(); });

  const fail = (key) => { error.dataset.key = key; error.textContent = t(key); };

  return new Promise((resolve) => {
    form.addEventListener('submit', async function onSubmit(ev) {
      ev.preventDefault();
      fail('');
      error.textContent = '';
      const checked = validPseudonym(form.elements.pseudonym.value);
      if (checked.error) { fail(checked.error); form.elements.pseudonym.focus(); return; }
      if (!form.elements.pledge.checked) { fail('join.error_pledge'); form.elements.pledge.focus(); return; }
      const only = listenOnly.checked;
      if (!only && !(await openMic())) { fail('join.error_mic'); return; }
      stopMeter();       // the room shows its own indicators; the stream itself stays open
      form.removeEventListener('submit', onSubmit);
      $('#join').disabled = true;
      resolve({ name: checked.name, listenOnly: only, stream: only ? null : stream });
    });
  });
}
