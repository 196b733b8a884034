"""End-to-end workflows built on the data pipeline and the trained modules (import the module
you need, e.g. ``workflows.classify``: the package itself imports nothing)."""
