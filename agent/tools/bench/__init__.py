"""Benchmarks: `edge-agent bench` (benchmark.py), `bench-ab` (ab.py) and the grpcio-only reference (transport.py)."""
