// node --test web/tests/ — the client's room state, without a browser.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  emptyState, loadSnapshot, applyEvent, mayBeHeard, airtimeOf, self,
} from '../js/state.js';
import { validPseudonym } from '../js/ui-join.js';

const snapshot = (over = {}) => ({
  circle: { id: 'c', title: 'T', topic: '', language: 'id', floor_mode: 'hands', turn_seconds: 180, capacity: 15, locked: false },
  version: 7,
  me: 'a',
  members: [
    { id: 'a', name: 'Melati', role: 'member', seat: 0, listen_only: false, muted: true, hand: false, connected: true },
    { id: 'b', name: 'Mawar', role: 'member', seat: 1, listen_only: false, muted: true, hand: false, connected: true },
    { id: 'm', name: 'Kak Rani', role: 'moderator', seat: 2, listen_only: false, muted: false, hand: false, connected: true },
  ],
  floor: { holder: null, deadline: null },
  queue: [],
  moderator_present: true,
  ...over,
});

function joined(over) {
  const state = emptyState();
  loadSnapshot(state, snapshot(over), { member_id: 'a', role: 'member' });
  return state;
}

test('a member enters muted and cannot be heard', () => {
  const s = joined();
  assert.equal(self(s).muted, true);
  assert.equal(mayBeHeard(s), false);
});

test('being given the floor prompts, and only unmuting makes one heard', () => {
  const s = joined();
  const fx = applyEvent(s, 'floor_given', { member_id: 'a', deadline: Date.now() + 180000 }, 8);
  assert.ok(fx.some((f) => f.prompt === 'floor'));
  assert.equal(mayBeHeard(s), false, 'still muted: the prompt asks, it does not unmute');
  applyEvent(s, 'unmuted', { member_id: 'a' }, 9);
  assert.equal(mayBeHeard(s), true);
  applyEvent(s, 'floor_released', { member_id: 'a' }, 10);
  assert.equal(mayBeHeard(s), false, 'unmuted but without the floor: silent by the rules');
});

test('open mode lets an unmuted member be heard without the floor', () => {
  const s = joined();
  applyEvent(s, 'unmuted', { member_id: 'a' }, 8);
  applyEvent(s, 'mode_changed', { mode: 'open' }, 9);
  assert.equal(mayBeHeard(s), true);
});

test('hand queue follows the server and marks hands', () => {
  const s = joined();
  applyEvent(s, 'hand_raised', { member_id: 'b', queue: ['b'] }, 8);
  applyEvent(s, 'hand_raised', { member_id: 'a', queue: ['b', 'a'] }, 9);
  assert.deepEqual(s.queue, ['b', 'a']);
  assert.equal(s.members.get('a').hand, true);
  applyEvent(s, 'floor_given', { member_id: 'b', deadline: null }, 10);
  assert.deepEqual(s.queue, ['a']);
});

test('a member who leaves is nowhere: roster, queue, floor', () => {
  const s = joined({ queue: ['b'], floor: { holder: 'b', deadline: null } });
  applyEvent(s, 'member_left', { member_id: 'b' }, 8);
  assert.equal(s.members.has('b'), false);
  assert.deepEqual(s.queue, []);
  assert.equal(s.floor.holder, null);
});

test('a quiet leave notice still names the member after the roster change', () => {
  const s = joined();
  applyEvent(s, 'member_left', { member_id: 'b' }, 8);
  const fx = applyEvent(s, 'member_left_quietly', { member_id: 'b', need_support: true }, 8);
  assert.equal(fx[0].notice, 'notice.left_quietly_support');
  assert.equal(fx[0].vars.name, 'Mawar');
  assert.equal(fx[0].urgent, true);
});

test('unmute_requested prompts; muted by a moderator clears the prompt', () => {
  const s = joined();
  assert.ok(applyEvent(s, 'unmute_requested', {}, 8).some((f) => f.prompt === 'asked'));
  applyEvent(s, 'unmuted', { member_id: 'a' }, 9);
  const fx = applyEvent(s, 'muted', { member_id: 'a', by: 'moderator' }, 10);
  assert.ok(fx.some((f) => f.prompt === null));
  assert.equal(self(s).muted, true);
});

test('airtime adds up finished turns', () => {
  const s = joined({ airtime: { b: 10 } });
  s.clockOffset = 0;
  applyEvent(s, 'floor_given', { member_id: 'b', deadline: null }, 8);
  s.floor.since -= 5000;
  applyEvent(s, 'floor_released', { member_id: 'b' }, 9);
  assert.ok(Math.abs(airtimeOf(s, 'b') - 15) < 0.5);
});

test('the admitted snapshot keeps the id the lobby gave', () => {
  const s = emptyState();
  s.me = 'a';
  const snap = snapshot();
  delete snap.me;
  loadSnapshot(s, snap);
  assert.equal(self(s).name, 'Melati');
  assert.equal(s.role, 'member');
});

test('pseudonyms: trimmed, 1 to 32 characters, no control characters', () => {
  assert.deepEqual(validPseudonym('  Melati  '), { name: 'Melati' });
  assert.ok(validPseudonym('   ').error);
  assert.ok(validPseudonym('x'.repeat(33)).error);
  assert.ok(validPseudonym('a\u0007b').error);
  assert.deepEqual(validPseudonym('🌸'.repeat(32)), { name: '🌸'.repeat(32) });
});

test('version steps: next applies, a gap is applied (no sync), old ones are skipped', async () => {
  const { versionStep } = await import('../js/state.js');
  assert.equal(versionStep(7, 8, false), 'apply');
  assert.equal(versionStep(7, 10, true), 'apply', 'a gap is events for others: no sync');
  assert.equal(versionStep(7, 10, false), 'apply');
  assert.equal(versionStep(7, 6, true), 'skip');
  assert.equal(versionStep(7, 7, false), 'skip', 'the snapshot already holds version 7');
  assert.equal(versionStep(7, 7, true), 'apply', 'a second event of the same command');
  assert.equal(versionStep(null, 3, false), 'apply');
});
