"""The write engine: the executor, the write session, workers and ranks."""
