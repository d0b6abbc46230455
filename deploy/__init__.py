"""fedlora.deploy: create a federation and start its processes, secure by default.

``fedlora federation init`` makes a certificate authority, the SuperLink's TLS certificate and
each hospital's SuperNode authentication key pair (:mod:`.pki`, :mod:`.federation`);
``fedlora federation superlink`` and ``fedlora federation node`` start Flower's own
``flower-superlink`` and ``flower-supernode`` with TLS and SuperNode authentication on, and
register the roster's nodes with ``flwr supernode register`` (:mod:`.launch`). No transport of
fedlora's own: everything on the wire is Flower's. Needs ``cryptography`` and Flower's command
line tools; never torch.
"""
