"""Built-in plugins, one per module (with the helper modules they use beside them).

They are registered exactly as third-party plugins are: as entry points of the
``pti_plugin.plugins`` group. The list is declared once, with the discovery that reads it
(:data:`pti_plugin.hooks.BUILTIN_ENTRY_POINTS`, which ``setup.py`` installs).
"""
