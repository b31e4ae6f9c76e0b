"""The gRPC transport: AWS.LookoutVision.EdgeAgent over a Unix socket (and optional TCP)."""
