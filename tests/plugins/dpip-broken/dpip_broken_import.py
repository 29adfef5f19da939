"""Fails as it is imported, as a plugin with a missing dependency would."""

raise ImportError("No module named 'scipy_that_is_not_installed'")
