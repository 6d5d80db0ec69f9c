"""rnnserve-server: numpy character-level RNNs served over gRPC."""
