"""Fuzzing at scale (`make fuzz`): frames through the real session, manager and rules."""
