"""The live sessions: the registry (id -> session), residency (memory budgets, eviction), the
write-behind checkpoint writer, the factory that makes sessions, and the session itself."""
