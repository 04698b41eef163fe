"""Deployment: export (ONNX, TorchScript), optimization (BN folding, INT8), the latency
benchmark, and the inference core (decoding, batching) the BentoML service wraps. ONNX Runtime
sessions are :mod:`imageclf.onnx_runtime`'s, a base module the registry uses too."""
