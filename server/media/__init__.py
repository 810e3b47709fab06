"""Media relay: encoded Opus forwarded between members' PeerConnections, gated by the room."""

from .relay import MediaRelay, OfferError, OfferProblem

__all__ = ["MediaRelay", "OfferError", "OfferProblem"]
