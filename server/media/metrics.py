"""Prometheus counters of the media relay. No labels: nothing here may name a person."""

from prometheus_client import Counter, Histogram

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
FULL_COLLECTIONS = Histogram(
    "lingkar_media_full_collection_seconds",
    "Full garbage collections run after media connections closed, by how long they held the loop",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
