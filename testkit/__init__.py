"""Tools for the tests, the benches and the load test, each written once.

- `ports`: free loopback ports, and a bound listening socket whose port is ours.
- `redis_server`: a throwaway real `redis-server` (TLS too) and what tests ask of one.
- `redis_cluster`: a throwaway Redis Cluster (3 masters, 3 replicas), a master killed, its
  replica's promotion awaited.
- `stats`: percentiles, a latency summary, RFC 3550 jitter.
- `opus`: a tone encoded with libopus, the one test-packet marker, a paced track, a lean tap.
- `procs`: /proc readings of a process's CPU time and memory, and stopping a child.
- `http`: one JSON call to the HTTP API with the standard library.
- `loop`: running a load generator on uvloop with its garbage collector kept quiet.

It imports none of the project's packages (tests/test_layers.py checks): it talks to a
server only over its public surfaces, so the tests, the benches and the load test can all
use it.
"""
