"""Whole federations on one machine: `gkt-hub simulate` (broker, hub and device processes)
and the in-process runners (GKT and the FedAvg/centralized baselines, throttled fleets)."""
