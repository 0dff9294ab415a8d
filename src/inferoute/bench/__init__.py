"""Benchmarks: ``inferoute bench <name>``. Each compares inferoute with a reference in the same run."""
