"""Ahead-of-time compile-and-fit: what each stage compiles, target slices, collectives, preflight."""
