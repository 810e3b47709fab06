"""Prometheus counters of the media relay. No labels: nothing here may name a person."""

from prometheus_client import Counter

PACKETS_IN = Counter("lingkar_media_packets_in_total", "RTP packets received from microphones")
PACKETS_FORWARDED = Counter("lingkar_media_packets_forwarded_total", "RTP packets handed to listeners' slots")
PACKETS_DROPPED = Counter(
    "lingkar_media_packets_dropped_total", "RTP packets dropped because the sender may not be heard"
)
CANDIDATES_REFUSED = Counter(
    "lingkar_media_candidates_refused_total",
    "ICE candidate lines left out of clients' offers: the relay sends no checks there",
)
OFFERS_REFUSED_NO_PORT = Counter(
    "lingkar_media_offers_refused_no_port_total",
    "Offers refused because every port of LINGKAR_MEDIA_PORTS was taken",
)
