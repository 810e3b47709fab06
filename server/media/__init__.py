"""Media relay: encoded Opus forwarded between members' PeerConnections, gated by the room."""

from .candidates import AddressKind, own_address_kinds
from .relay import MediaRelay, OfferError, OfferProblem

__all__ = ["AddressKind", "MediaRelay", "OfferError", "OfferProblem", "own_address_kinds"]
