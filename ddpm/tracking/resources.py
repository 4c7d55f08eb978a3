"""Process and device resource readings, logged next to the loss every `tracking.log_every` steps.

A reading that cannot be taken (no CUDA, no NVML, a driver error) is left out of the dict rather
than reported as 0, so a plot never shows a fake "0 % GPU utilisation".
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)

_MB = 2**20


class ResourceMonitor:
    """Cheap, non-blocking resource samples for one training device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._process = psutil.Process()
        # cpu_percent(None) measures since the previous call; the first call only sets the origin
        self._process.cpu_percent(interval=None)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._nvml = _nvml_handle(self.device) if self._cuda else None

    def sample(self) -> dict[str, float]:
        """CPU % of this process since the last sample, its RSS, system memory %, and CUDA readings.

        Keys: resources/cpu_percent, resources/rss_mb, resources/system_memory_percent; on CUDA
        also resources/cuda_allocated_mb, cuda_reserved_mb, cuda_peak_mb and, when NVML works,
        resources/gpu_util_percent.
        """
        out = {
            "resources/cpu_percent": float(self._process.cpu_percent(interval=None)),
            "resources/rss_mb": self._process.memory_info().rss / _MB,
            "resources/system_memory_percent": float(psutil.virtual_memory().percent),
        }
        if self._cuda:
            out.update(self._cuda_memory())
            util = self._gpu_util()
            if util is not None:
                out["resources/gpu_util_percent"] = util
        return out

    def _cuda_memory(self) -> dict[str, float]:
        """The caching allocator's view of this process on the device, in MB."""
        return {
            "resources/cuda_allocated_mb": torch.cuda.memory_allocated(self.device) / _MB,
            "resources/cuda_reserved_mb": torch.cuda.memory_reserved(self.device) / _MB,
            "resources/cuda_peak_mb": torch.cuda.max_memory_allocated(self.device) / _MB,
        }

    def _gpu_util(self) -> float | None:
        """Device utilisation % over NVML's last sample period; None (and NVML dropped) on error."""
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        try:
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as err:  # noqa: BLE001 - pynvml raises NVMLError subclasses per failure
            log.warning("NVML utilisation query failed (%s); GPU utilisation is no longer logged", err)
            self._nvml = None
            return None


def _nvml_handle(device: torch.device) -> tuple[Any, Any] | None:
    """(pynvml module, handle) for the torch device, or None when nvidia-ml-py is missing or fails.

    The handle is looked up by the device's UUID, not its index: under CUDA_VISIBLE_DEVICES the
    torch index and the NVML index of the same GPU differ.
    """
    try:
        import pynvml  # from nvidia-ml-py (the `gpu` extra); optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as err:  # noqa: BLE001 - any NVML/driver failure means "not available"
        log.debug("NVML unavailable (%s); GPU utilisation is not logged", err)
        return None
