"""fedlora.protocol: what crosses the wire between a node and the server.

The one place that names the records and keys a client sends and the server accepts, and checks
them (names, shapes, dtypes, finiteness). Needs numpy and Flower's record types; never torch.
"""
