"""Model delivery: every device gets its composed model (its extractor + the server) as
verified ONNX, at the end of a run and when it asks (docs/predict.md)."""
