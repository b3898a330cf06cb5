"""Host values onto the device without stalling the host. torch's ordinary host-to-device copy synchronizes the
stream, so the host would wait for every queued kernel, a decode launched ahead included; a copy from pinned
memory is queued like a kernel instead (torch keeps the pinned buffer until the copy has run)."""

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a `dtype` tensor on `device`; asynchronous when that is a GPU."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
