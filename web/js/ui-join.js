// The join form (F2): pseudonym, speak or listen only, mic check, pledge, reminders.
// media.js is loaded only when the microphone is wanted.
import { t } from './i18n.js';

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
 * Runs the join form; resolves when the member enters with {who: {name, listenOnly, stream}, room}:
 * `stream` is the mic (null when listening only), `room` what loadRoom() gave (awaited here).
 */
export function runJoin({ loadRoom }) {
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
      const { requestMicrophone, watchLevel } = await import('./media.js');
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

  const button = $('#join');
  const label = (key) => { button.dataset.i18n = key; button.textContent = t(key); };
  return new Promise((resolve) => {
    let busy = false;
    form.addEventListener('submit', async function onSubmit(ev) {
      ev.preventDefault();
      if (busy) return;
      fail('');
      error.textContent = '';
      const checked = validPseudonym(form.elements.pseudonym.value);
      if (checked.error) { fail(checked.error); form.elements.pseudonym.focus(); return; }
      if (!form.elements.pledge.checked) { fail('join.error_pledge'); form.elements.pledge.focus(); return; }
      const only = listenOnly.checked;
      busy = true;
      button.disabled = true;
      let entered = false;
      try {
        if (!only && !(await openMic())) { fail('join.error_mic'); return; }
        let room;
        label('join.loading');     // shown only if the room's modules are not in yet
        try { room = await loadRoom(); } catch { fail('join.error_load'); return; } finally {
          label('join.enter');
        }
        stopMeter();       // the room shows its own indicators; the stream itself stays open
        form.removeEventListener('submit', onSubmit);
        entered = true;    // the button stays disabled
        resolve({ who: { name: checked.name, listenOnly: only, stream: only ? null : stream }, room });
      } finally {
        busy = false;
        if (!entered) button.disabled = false;
      }
    });
  });
}
