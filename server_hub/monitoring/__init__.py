"""What a running hub shows: the fleet snapshot, Prometheus metrics, the status page."""
