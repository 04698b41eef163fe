"""Getting images in: fetching, the canonical on-disk dataset, and fast in-memory loaders."""
