"""Keeping circles: the stores (memory, Redis), the codec, the manager that runs commands
against them, the event hubs, the leases (homes). Built on the pure core in `rooms`."""
