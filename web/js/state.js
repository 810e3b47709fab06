// The client's copy of the room state (DESIGN §5 snapshot) and how each event changes it.
// applyEvent returns "effects" for the UI (prompts, notices, announcements); it never touches the DOM.

export const key = (id) => String(id);

export function emptyState() {
  return {
    circle: null, version: null, me: null, role: null,
    members: new Map(), lobby: new Map(), queue: [],
    floor: { holder: null, deadline: null, since: null },
    moderator_present: true, airtime: {}, turnWarning: false,
    names: new Map(),   // id -> pseudonym, kept after a leave so a notice can still name them
    clockOffset: 0,     // server now - local now (ms)
  };
}

export const serverNow = (state) => Date.now() + state.clockOffset;

/** Replace the state with a snapshot (welcome.state, admitted.state, snapshot.state). */
export function loadSnapshot(state, snap, extra = {}) {
  state.circle = { ...(snap.circle ?? state.circle ?? {}) };
  state.version = snap.version ?? state.version;
  const me = extra.member_id ?? snap.me ?? state.me;
  state.me = me !== null && typeof me === 'object' ? me.id : me;
  state.members = new Map();
  for (const m of snap.members ?? []) addMember(state, m);
  state.lobby = new Map();
  for (const m of snap.lobby ?? []) { state.lobby.set(key(m.id), { ...m }); state.names.set(key(m.id), m.name); }
  state.queue = [...(snap.queue ?? [])];
  const holder = snap.floor?.holder ?? null;
  const sameTurn = holder !== null && state.floor.holder !== null && key(holder) === key(state.floor.holder);
  state.floor = {
    holder, deadline: snap.floor?.deadline ?? null,
    since: sameTurn ? state.floor.since : (holder !== null ? serverNow(state) : null),
  };
  state.moderator_present = snap.moderator_present ?? true;
  state.airtime = { ...(snap.airtime ?? {}) };
  state.role = extra.role ?? self(state)?.role ?? state.role;
  if (holder === null) state.turnWarning = false;
}

function addMember(state, m) {
  state.members.set(key(m.id), { ...m });
  state.names.set(key(m.id), m.name);
}

export const self = (state) => (state.me == null ? null : state.members.get(key(state.me)));
export const isMe = (state, id) => id != null && state.me != null && key(id) === key(state.me);
export const isModerator = (state) => state.role === 'moderator';
export const holdsFloor = (state) => isMe(state, state.floor.holder);
export const nameOf = (state, id) => state.names.get(key(id)) ?? '?';

/** May this member be heard now (DESIGN §4 invariant 2)? Used to keep the mic track quiet. */
export function mayBeHeard(state) {
  const me = self(state);
  if (!me || me.muted || me.listen_only) return false;
  return isModerator(state) || holdsFloor(state) || state.circle?.floor_mode === 'open';
}

/** Seconds of airtime, counting the running turn. */
export function airtimeOf(state, id) {
  let seconds = Number(state.airtime[key(id)] ?? 0);
  if (state.floor.holder != null && key(state.floor.holder) === key(id) && state.floor.since) {
    seconds += Math.max(0, (serverNow(state) - state.floor.since) / 1000);
  }
  return seconds;
}

function endTurn(state) {
  const { holder, since } = state.floor;
  if (holder != null && since) {
    const k = key(holder);
    state.airtime[k] = Number(state.airtime[k] ?? 0) + Math.max(0, (serverNow(state) - since) / 1000);
  }
  state.floor = { holder: null, deadline: null, since: null };
  state.turnWarning = false;
}

function dropMember(state, id) {
  const k = key(id);
  state.members.delete(k);
  state.lobby.delete(k);
  state.queue = state.queue.filter((q) => key(q) !== k);
  if (state.floor.holder != null && key(state.floor.holder) === k) endTurn(state);
}

function setMember(state, id, fields) {
  const m = state.members.get(key(id));
  if (m) Object.assign(m, fields);
  return m;
}

function setQueue(state, queue) {
  state.queue = [...(queue ?? [])];
  const raised = new Set(state.queue.map(key));
  for (const [k, m] of state.members) m.hand = raised.has(k);
}

const MODE_ANNOUNCE = { hands: 'announce.mode_hands', round: 'announce.mode_round', open: 'announce.mode_open' };

const HANDLERS = {
  member_joined(s, d) {
    addMember(s, d.member);
    s.lobby.delete(key(d.member.id));
    return [{ announce: 'announce.joined', vars: { name: d.member.name } }];
  },
  member_left(s, d) { dropMember(s, d.member_id); return []; },
  member_removed(s, d) { dropMember(s, d.member_id); return []; },
  member_left_quietly(s, d) {
    dropMember(s, d.member_id);
    return [{ notice: d.need_support ? 'notice.left_quietly_support' : 'notice.left_quietly',
      vars: { name: nameOf(s, d.member_id) }, urgent: !!d.need_support }];
  },
  presence(s, d) { setMember(s, d.member_id, { connected: !!d.connected }); return []; },
  lobby_waiting(s, d) {
    s.lobby.set(key(d.member.id), { ...d.member });
    s.names.set(key(d.member.id), d.member.name);
    return [{ notice: 'notice.lobby_waiting', vars: { name: d.member.name } }];
  },
  lobby_left(s, d) { s.lobby.delete(key(d.member_id)); return []; },
  hand_raised(s, d) { setQueue(s, d.queue); return []; },
  hand_lowered(s, d) { setQueue(s, d.queue); return []; },
  floor_given(s, d) {
    if (s.floor.holder != null) endTurn(s);
    s.floor = { holder: d.member_id, deadline: d.deadline ?? null, since: serverNow(s) };
    s.turnWarning = false;
    setMember(s, d.member_id, { hand: false });
    s.queue = s.queue.filter((q) => key(q) !== key(d.member_id));
    const effects = [{ announce: isMe(s, d.member_id) ? 'announce.floor_you' : 'announce.floor_given',
      vars: { name: nameOf(s, d.member_id) } }];
    if (isMe(s, d.member_id)) effects.push({ prompt: 'floor' });
    return effects;
  },
  floor_released(s) {
    endTurn(s);
    return [{ announce: 'announce.floor_released' }, { prompt: null }];
  },
  turn_warning(s) { s.turnWarning = true; return [{ announce: 'announce.turn_warning' }]; },
  turn_over(s, d) { return [{ notice: 'notice.turn_over', vars: { name: nameOf(s, d.member_id) } }]; },
  mode_changed(s, d) {
    if (s.circle) s.circle.floor_mode = d.mode;
    endTurn(s);
    return [{ announce: MODE_ANNOUNCE[d.mode] ?? 'announce.mode_changed' }, { prompt: null }];
  },
  muted(s, d) {
    setMember(s, d.member_id, { muted: true });
    if (isMe(s, d.member_id) && d.by === 'moderator') return [{ announce: 'announce.muted_by_moderator' }, { prompt: null }];
    return [];
  },
  unmuted(s, d) {
    setMember(s, d.member_id, { muted: false });
    return isMe(s, d.member_id) ? [{ prompt: null }] : [];
  },
  unmute_requested() { return [{ prompt: 'asked' }]; },
  moderator_present(s, d) {
    s.moderator_present = !!d.present;
    return [{ announce: d.present ? 'announce.moderator_back' : 'announce.moderator_away' }];
  },
  locked(s, d) { if (s.circle) s.circle.locked = !!d.locked; return []; },
  private_note(s, d) {
    return [{ notice: d.need_support ? 'notice.private_note_support' : 'notice.private_note',
      vars: { name: nameOf(s, d.member_id) }, text: d.text ?? '', urgent: !!d.need_support }];
  },
};

/**
 * What to do with an event of version `v` when our state is at `have`: 'apply' or 'skip' (already
 * in our state: the snapshot we hold is at that version or later). Events of one command share a
 * version, so a repeat of the version just applied from an event is applied too.
 *
 * A gap (v > have + 1) is applied as well, never a reason to `sync`: events are filtered by
 * audience (moderator-only and one-member events bump the room version too), so a member sees
 * gaps all the time, and the server already guarantees in-order, loss-free delivery on each
 * connection (it sends a `snapshot` itself when it cannot replay). See protocol.js.
 */
export function versionStep(have, v, lastWasEvent) {
  if (have == null || typeof v !== 'number') return 'apply';
  if (v < have || (v === have && !lastWasEvent)) return 'skip';
  return 'apply';
}

/** Apply one event; returns UI effects. Unknown events are ignored (a newer server). */
export function applyEvent(state, name, data, version) {
  const handler = HANDLERS[name];
  if (typeof version === 'number') state.version = version;
  return handler ? handler(state, data ?? {}) : [];
}
