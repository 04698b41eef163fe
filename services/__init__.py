"""Serving: the BentoML service (service.py), its bentofile, and the web page it serves."""
