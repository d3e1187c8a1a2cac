"""`--mode async`: no rounds; the hub trains on the newest features of every device,
down-weighted by staleness (docs/async.md)."""
