"""Benchmark tooling for the relay: fake upstream, load generator and the runner."""
