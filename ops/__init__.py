"""Team mode: the shared servers (ops.team), their container description (compose.yaml), and
local server processes on loopback (ops.local_servers: team mode, the tests, the benchmarks)."""
