"""rnnserve: client library for the rnnserve gRPC service."""
