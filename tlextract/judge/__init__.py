"""Judges (protocol, cache, local and HTTP implementations, a registry by kind) and the keep
rule."""
