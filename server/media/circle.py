"""Who hears whom in one circle: the audible set, slot views, routes and speaking levels.

No network and no aiortc here: the relay feeds this with members joining and leaving,
with the audible list from the room state, and with tapped packets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .slot import Route, Slot

Slots = list[str | None]

SILENT_LEVEL = 127  # RFC 6464: level is -dBov, 0 loudest, 127 silence


def place(previous: Sequence[str | None], wanted: Sequence[str]) -> Slots:
    """Put `wanted` (at most len(previous) members) into slots, keeping anyone who stays
    in the slot they already had, and filling freed slots in `wanted` order."""
    keep = set(wanted)
    slots: Slots = [m if m in keep else None for m in previous]
    placed = {m for m in slots if m is not None}
    free = (i for i, m in enumerate(slots) if m is None)
    for member in wanted:
        if member not in placed:
            slots[next(free)] = member
    return slots


@dataclass
class Listener:
    slots: list[Slot]
    view: Slots


@dataclass
class MediaCircle:
    """The relay's media state of one circle (not its settings: `rooms.model.CircleSettings`)."""

    circle_id: str
    audible: tuple[str, ...] = ()
    audible_set: frozenset[str] = frozenset()
    # members whose microphone reaches the relay (admitted, not listening only)
    speakers: set[str] = field(default_factory=set)
    listeners: dict[str, Listener] = field(default_factory=dict)
    # source member -> the slots currently carrying it
    routes: dict[str, Route] = field(default_factory=dict)
    # loudest level seen per member since the last report, and who was last reported
    levels: dict[str, int] = field(default_factory=dict)
    reported: dict[str, int] = field(default_factory=dict)

    def set_audible(self, audible: Iterable[str]) -> None:
        self.audible = tuple(dict.fromkeys(audible))  # ordered, without duplicates
        self.audible_set = frozenset(self.audible)

    def reassign(self) -> dict[str, Slots]:
        """Recompute every listener's slots; return the views that changed."""
        heard = [m for m in self.audible if m in self.speakers]
        changed: dict[str, Slots] = {}
        carrying: dict[str, list[Slot]] = {}
        for member_id, listener in self.listeners.items():
            wanted = [m for m in heard if m != member_id][: len(listener.slots)]
            view = place(listener.view, wanted)
            for slot, source in zip(listener.slots, view, strict=True):
                slot.set_source(source)
                if source is not None:
                    carrying.setdefault(source, []).append(slot)
            if view != listener.view:
                listener.view = view
                changed[member_id] = list(view)
        self.routes = {source: Route(slots) for source, slots in carrying.items()}
        return changed

    def forward(self, source: str, timestamp: int, payload: bytes, level: int | None) -> int:
        """Forward one packet of `source` to every slot carrying it, now; return how many
        slots got it, or -1 if gated. `level` (ssrc-audio-level) goes along with it."""
        if source not in self.audible_set:
            return -1
        if level is not None:
            self.levels[source] = min(level, self.levels.get(source, SILENT_LEVEL))
        route = self.routes.get(source)
        if not route:
            return 0
        route.push(timestamp, payload, level, time.time())
        return len(route)

    def take_levels(self) -> dict[str, int] | None:
        """The loudest level per member since the last call (silence for members who sent
        nothing since), or None when nothing changed since the last report."""
        report = {m: SILENT_LEVEL for m in self.reported}
        report.update(self.levels)
        self.levels.clear()
        if report == self.reported:
            return None
        self.reported = report
        return dict(report)

    def remove(self, member_id: str) -> dict[str, Slots]:
        self.speakers.discard(member_id)
        listener = self.listeners.pop(member_id, None)
        if listener is not None:
            for slot in listener.slots:
                slot.stop()
        self.levels.pop(member_id, None)
        self.reported.pop(member_id, None)
        return self.reassign()
