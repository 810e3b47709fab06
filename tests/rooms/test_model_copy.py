"""`RoomState.copy` passes its fields by position: every field must land where it belongs."""

from __future__ import annotations

import dataclasses

from rooms.model import CircleSettings, Floor, FloorMode, Invite, Member, Role, RoomState


def test_copy_keeps_every_field_and_shares_no_container() -> None:
    m = Member(id="m1", name="Ani", role=Role.MEMBER, invite_id="i1", seat=1)
    lob = Member(id="m2", name="Budi", role=Role.GUEST, invite_id="i2")
    state = RoomState(
        circle=CircleSettings(id="c1", title="t"), version=7, mode=FloorMode.OPEN, locked=True,
        members={"m1": m}, lobby={"m2": lob}, floor=Floor("m1", 1, 2), queue=["m1"],
        invites={"i1": Invite("i1", Role.MEMBER)}, revoked={"i9"}, invite_holders={"i1": "m1"},
        screen_shared_links=True, airtime={"m1": 5}, next_seat=3, ended=True, knocks=[11],
        declined={"tag": 12},
    )
    copy = state.copy()
    assert copy == state
    for f in dataclasses.fields(RoomState):
        ours, theirs = getattr(state, f.name), getattr(copy, f.name)
        assert theirs == ours and type(theirs) is type(ours), f.name
        if isinstance(ours, dict | list | set):
            assert theirs is not ours, f.name
