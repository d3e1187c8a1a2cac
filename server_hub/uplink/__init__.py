"""Uplink economy on the hub: the feature maps it holds per device, and byte accounting."""
