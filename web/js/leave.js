// Leave quietly (F8): blank the screen first, then stop media, tell the server, forget
// everything stored, and replace the page so Back does not return. No sound, no confirm.

const SHIFT_PRESSES = 3;
const SHIFT_WINDOW_MS = 1500;
const FLUSH_WAIT_MS = 300;

let leaving = false;

function blankNow() {
  const html = document.documentElement;
  html.setAttribute('data-blank', '');
  html.style.background = '#fff';
  if (document.body) document.body.style.visibility = 'hidden';
  for (const el of document.querySelectorAll('audio')) el.muted = true;
}

function forgetEverything() {
  try { sessionStorage.clear(); } catch { /* unavailable */ }
  try { localStorage.clear(); } catch { /* unavailable */ }
}

/**
 * ctx(): {session, media, exitUrl, needSupport} — read at the moment of leaving.
 * Installs the button handler and the Shift×3 shortcut.
 */
export function installQuietLeave(button, ctx) {
  const leave = () => leaveQuietly(ctx());
  button.addEventListener('click', leave);
  // Count only bare Shift presses (down and up with no other key between), so typing capital
  // letters in a name or a message never triggers it.
  let presses = [];
  let bare = false;
  addEventListener('keydown', (ev) => { bare = ev.key === 'Shift' && !ev.repeat; }, true);
  addEventListener('keyup', (ev) => {
    if (ev.key !== 'Shift' || !bare) return;
    bare = false;
    const now = performance.now();
    presses = presses.filter((at) => now - at < SHIFT_WINDOW_MS);
    presses.push(now);
    if (presses.length >= SHIFT_PRESSES) leave();
  }, true);
}

export function leaveQuietly({ session, media, exitUrl, needSupport }) {
  if (leaving) return;
  leaving = true;
  blankNow();                                       // synchronously, before anything else
  try { media?.stop(); } catch { /* keep going */ }
  try { session?.fire('leave_quietly', { need_support: !!needSupport }); } catch { /* best effort */ }
  forgetEverything();
  const go = () => location.replace(exitUrl || '/bye');
  if (!session) { go(); return; }
  // Give the frame a moment to leave the socket buffer; the screen is already blank.
  const started = performance.now();
  const wait = () => {
    if (session.bufferedAmount === 0 || performance.now() - started > FLUSH_WAIT_MS) {
      session.close();
      go();
    } else setTimeout(wait, 20);
  };
  wait();
}
