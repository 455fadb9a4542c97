"""The local dev stack behind `make run`."""
