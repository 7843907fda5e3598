"""Built-in plugins, one per module (with the helper modules they use beside them).

They are registered exactly as third-party plugins are: as entry points of the
``pti_plugin.plugins`` group. This list is the one place they are declared; ``setup.py`` installs it
and ``hooks.discover_plugins`` reads it too (so a stale editable install still finds them).
"""

BUILTIN_ENTRY_POINTS = (
    "staged_schedule = pti_plugin.plugins.staged_schedule:StagedSchedule",
    "pivot_norm = pti_plugin.plugins.pivot_norm:PivotNorm",
    "pivot_locality = pti_plugin.plugins.pivot_locality:PivotLocality",
)
