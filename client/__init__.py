"""fedlora.client: a node that fine-tunes LoRA on its private data over a quantized base.

Only adapter deltas and whitelisted scalar metrics leave a node (see fedlora.protocol).
"""
