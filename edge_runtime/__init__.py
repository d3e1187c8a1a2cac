"""Everything a device runs, plus the contract shared with the hub.

Imports nothing from ``server_hub``, ``export`` or ``device_profiles`` so that a device
needs only the base install.
"""

__version__ = "0.1.0"
