"""Adapters that expose the core: the gRPC transport (grpc/), health and reflection, Prometheus metrics."""
