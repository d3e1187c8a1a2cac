"""The GKT hub. The top level is the main path of a synchronous round: the service, the
hub's state, the trainer, models, feature bank, journal, checkpoints and results; optional
features live in the subpackages."""
