"""Latency: device profiles, backends, fingerprints, profiler, lookup tables, validation."""
