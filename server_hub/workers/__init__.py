"""`--workers K` and torchrun: several hub processes train one server model with DDP,
splitting device traffic through an MQTT v5 shared subscription (docs/scaling.md)."""
