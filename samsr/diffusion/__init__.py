"""Diffusion processes: `samdiffsr` (METHOD.md §A) and `resshift` (METHOD.md §B); import the module you need."""
