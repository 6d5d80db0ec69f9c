"""The gRPC edge: the servicer (convert, call, convert), the converters, the one mapping of
errors to status codes, the interceptor and the page tokens. Everything below it is grpc-free."""
