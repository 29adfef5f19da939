"""Resource telemetry for heartbeats: CPU and memory from psutil, GPUs from NVML if present."""

from __future__ import annotations

import logging

import psutil

from plane.wire import Gpu

logger = logging.getLogger(__name__)


class Telemetry:
    """Samples this machine's load; NVML is optional (no NVIDIA GPU means ``Gpu(count=0)``)."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first reading is meaningless
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no library, no device: all mean "no GPU"
            logger.debug("no NVML: %s", e)

    def cpu_percent(self) -> float:
        return psutil.cpu_percent(interval=None)

    def memory_percent(self) -> float:
        return psutil.virtual_memory().percent

    def gpu(self) -> Gpu:
        if self._nvml is None:
            return Gpu()
        nv = self._nvml
        try:
            count = nv.nvmlDeviceGetCount()
            util = mem = 0.0
            for i in range(count):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                util += nv.nvmlDeviceGetUtilizationRates(h).gpu
                info = nv.nvmlDeviceGetMemoryInfo(h)
                mem += 100.0 * info.used / max(info.total, 1)
            return Gpu(count, util / max(count, 1), mem / max(count, 1))
        except Exception as e:
            logger.warning("NVML query failed: %s", e)
            return Gpu()
