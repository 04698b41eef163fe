"""Prometheus for the service: scrape config, alert rules (and their promtool unit tests)."""
