"""Deployment: export (ONNX, TorchScript), optimization (BN folding, INT8), ONNX Runtime, the
latency benchmark, and the serving core (decoding, batching) the BentoML service wraps."""
