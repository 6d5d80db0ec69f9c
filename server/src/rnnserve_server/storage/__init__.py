"""Where sessions are kept: the Store protocol, the local data-directory store, the checkpoint
record and the reading of its files, and session archives."""
