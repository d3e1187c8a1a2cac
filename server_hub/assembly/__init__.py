"""Building a running hub from typed options (the one path serve, workers and simulate use)."""
