"""The frames a fuzzer sends: random bytes, mutated valid frames, and frames built from the
msgspec schemas of `signaling.frames` (each field right most of the time, wrong sometimes),
plus text frames and a few known nasties. Fast and seeded (no hypothesis: a million frames)."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import msgspec

from signaling import frames as f

_SCHEMAS: dict[str, list[msgspec.inspect.Field]] = {
    str(cls.__struct_config__.tag): list(msgspec.inspect.type_info(cls).fields)  # type: ignore[union-attr]
    for cls in f.ClientFrame.__args__
}
# Valid commands a member may send often: the state keeps moving under the fuzz. Leaves are
# rarer (each costs a rejoin).
_CHURN = ["raise_hand", "lower_hand", "mute_self", "unmute_self", "sync", "release_floor", "pass"]
_NASTY = [
    b"\x91" * 60_000 + b"\xc0",
    b"\x81\xa1a" * 20_000 + b"\xc0",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,
    b"\xc6\x7f\xff\xff\xff",
    b"\x82\xa4type\xaaraise_hand\xa3ref\xc1",
    b"\x81\xa4type\xa5\xff\xfe\xfd\xfc\xfb",
    b"",
]


class FrameMaker:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.members: list[str] = []
        self._valid: list[bytes] = []

    def next(self) -> tuple[str, bytes | str]:
        roll = self.rng.random()
        if roll < 0.25:
            return "schema", self.schema_frame()
        if roll < 0.50:
            return "mutated", self.mutated()
        if roll < 0.70:
            return "random", self.rng.randbytes(self.rng.randrange(0, 48))
        if roll < 0.85:
            return "valid", self.valid()
        if roll < 0.95:
            return "values", msgpack.packb(self.value(3), use_bin_type=self.rng.random() < 0.5)
        if roll < 0.99:
            return "text", self.rng.choice(["", "raise_hand", '{"type": "raise_hand"}', "\x00" * 8])
        return "nasty", self.rng.choice(_NASTY)

    def valid(self) -> bytes:
        rng = self.rng
        kind = rng.choice(_CHURN) if rng.random() < 0.9 else rng.choice(["leave", "leave_quietly", "private_note"])
        frame: dict[str, Any] = {"type": kind}
        if rng.random() < 0.7:
            frame["ref"] = rng.randrange(1, 1 << 31)
        if kind == "private_note":
            frame["text"] = "tolong" * rng.randrange(0, 90)  # past 500 characters now and then
            frame["need_support"] = rng.random() < 0.5
        data = msgpack.packb(frame)
        self._valid.append(data)
        if len(self._valid) > 64:
            self._valid.pop(0)
        return data

    def schema_frame(self) -> bytes:
        rng = self.rng
        kind = rng.choice(list(_SCHEMAS))
        frame: dict[Any, Any] = {"type": kind}
        for field in _SCHEMAS[kind]:
            if rng.random() < 0.1:
                continue  # a field left out
            frame[field.name] = self.right(field) if rng.random() < 0.8 else self.value(2)
        if rng.random() < 0.05:
            frame[rng.choice(["zz", "extra", "member", 7])] = self.value(1)  # an unknown field
        return msgpack.packb(frame)

    def right(self, field: msgspec.inspect.Field) -> Any:
        rng = self.rng
        name = field.name
        if name == "member_id":
            return rng.choice(self.members) if self.members and rng.random() < 0.8 else self.text(16)
        if name == "ref":
            return rng.choice([None, rng.randrange(0, 1 << 31), -1, 2**63 - 1])
        if name == "seconds":
            return rng.choice([1, 60, 600, 0, 601, -5])
        if name == "mode":
            return rng.choice(["hands", "round", "open", "HANDS", ""])
        if name == "text":
            return self.text(rng.choice([0, 10, 500, 501]))
        if name in ("need_support", "listen_only"):
            return rng.random() < 0.5
        if name == "sdp":
            return rng.choice(["", "v=0\r\n", "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * rng.randrange(1, 50)])
        return self.text(rng.randrange(0, 40))

    def text(self, n: int) -> str:
        alphabet = "abcAZ09 _-\u00e9\u0000\u200b\U0001f600"
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def value(self, depth: int) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth <= 0 or roll < 0.6:
            return rng.choice([None, True, False, rng.randrange(-(2**63), 2**64), rng.random(),
                               self.text(rng.randrange(0, 12)), rng.randbytes(rng.randrange(0, 12))])
        if roll < 0.8:
            return [self.value(depth - 1) for _ in range(rng.randrange(0, 4))]
        return {rng.choice(["type", "ref", "member_id", "text", 1, b"k"]): self.value(depth - 1)
                for _ in range(rng.randrange(0, 4))}

    def mutated(self) -> bytes:
        rng = self.rng
        base = bytearray(rng.choice(self._valid) if self._valid else self.valid())
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            at = rng.randrange(0, len(base) + 1)
            if op < 0.4 and base:
                base[min(at, len(base) - 1)] = rng.randrange(256)
            elif op < 0.7:
                base[at:at] = rng.randbytes(rng.randrange(1, 4))
            elif base:
                del base[at:at + rng.randrange(1, 4)]
        return bytes(base)
