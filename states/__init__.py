"""The workflow file (workflow.toml), shipped inside the package as retracer.states."""
