"""Developer tooling, not needed to serve: benchmarks (bench/) and ONNX model generators (modelgen/)."""
