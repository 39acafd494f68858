"""The default configuration (retracer.toml), shipped inside the package as retracer.defaults."""
