"""The benchmark sections, one module each; each has section_<name>(bench) -> dict (bench/run.py picks them)."""
