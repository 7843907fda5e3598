"""Built-in plugins, one per module."""
