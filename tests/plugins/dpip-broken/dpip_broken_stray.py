"""Names something that is not a filter."""

value = {"name": "stray", "apply": "not a function"}
