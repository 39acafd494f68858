"""The symbol index: which package built each build-id, and the files themselves, from imported packages."""
