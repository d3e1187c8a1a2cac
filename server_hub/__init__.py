"""The GKT hub: server models, training, round coordination, MQTT service, simulation."""
