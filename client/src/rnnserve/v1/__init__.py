"""Generated protobuf and gRPC code for rnnserve.v1 (make proto). Never edit by hand."""
