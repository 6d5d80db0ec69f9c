"""What a caller can do (create, step, train, watch, generate, export, ...), with no transport:
the use cases check a request, run it on the sessions and report the outcome."""
