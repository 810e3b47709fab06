"""The join step that decides where a circle lives (DESIGN §8), outside the session: this
process claims the circle's lease, or names the process that holds it (a `redirect`)."""

from __future__ import annotations

from storage.homes import Homes
from storage.store import Owner, StaleOwner


class Leases:
    """The sessions' `Home` on a process with leases (`signaling.session.Home`)."""

    def __init__(self, homes: Homes) -> None:
        self.homes = homes

    async def place(self, circle_id: str, *, routed: bool = False) -> str | None:
        home = await self.homes.claim(circle_id)
        if not isinstance(home, Owner):
            return None
        if home.url == self.homes.url:
            # An earlier run of this process (same URL, now gone) still holds it: no
            # redirect to ourselves; the client retries once the lease is out.
            raise StaleOwner("the lease of an earlier run has not run out yet")
        if routed:  # the proxy sends this circle here: ask its home to hand it over
            await self.homes.ask_handover(home.url, circle_id)
        return home.url + "/ws"

    def fence(self, circle_id: str) -> int | None:
        """This process's lease token for the circle, or StaleOwner when it is not (or no
        longer surely) the circle's home: then nothing is written."""
        token = self.homes.fence(circle_id)
        if token is None:
            raise StaleOwner("this process is not the circle's home now")
        return token

    def recheck(self, circle_id: str) -> None:
        self.homes.recheck(circle_id)
