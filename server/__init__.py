"""fedlora.server: the Flower ServerApp that aggregates LoRA adapter deltas.

The server sees adapter deltas and whitelisted metrics only; it never imports client code.
"""
