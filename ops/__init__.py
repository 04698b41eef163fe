"""Team mode: the shared servers (ops.team), their container description (compose.yaml)."""
