"""Device profiles: a catalog of edge devices, FLOP and memory profiles of the toolkit's
models, per-device estimates, and the hardware-selection report behind ``gkt-profile``.

Modules that need no torch (``catalog``, ``this_machine``, ``estimate``) import without it.
"""
