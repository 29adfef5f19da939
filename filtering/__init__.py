"""Filters: the model they are written in (``model``), the registry of those a process runs
(``registry``: the built-ins of ``builtins`` and the plugins of installed packages), array
kernels and the GPU switch (``kernels``), stopping a job's work (``work``), and pipelines
(``pipeline``). Plugins import :mod:`dpip.filters`, the stable contract, never these."""
