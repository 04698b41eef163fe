"""Training: the loop (engine), transfer learning, DDP, and the profiler's view of a step."""
