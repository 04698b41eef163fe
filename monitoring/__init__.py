"""Monitoring: what the service sees compared with what the model learned from."""
