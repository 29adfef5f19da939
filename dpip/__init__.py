"""DPIP's public modules for code outside it: :mod:`dpip.filters`, the contract of filter plugins."""
