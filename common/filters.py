"""Deprecated: the old import path of the filter plugin contract, kept for one release so that
plugins written against it keep loading. Import :mod:`dpip.filters` instead."""

import logging

from dpip.filters import *  # noqa: F401,F403  (the contract, under its old name)
from dpip.filters import __all__  # noqa: F401

logging.getLogger(__name__).warning("a plugin imports common.filters, which is deprecated: import the same names"
                                    " from dpip.filters")
