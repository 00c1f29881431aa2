"""Training programs: each trains something on top of a model (I/O and progress bars allowed here)."""
