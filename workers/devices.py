"""Device placement: one worker, one device, chosen once at start."""

from __future__ import annotations

from api_client.errors import ModelError


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda:0`` where CUDA works, else ``cpu``; ``cuda:N`` is checked."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device}: CUDA is not available on this machine")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    raise ModelError(f"device {device!r}: expected cpu, cuda:N or auto")


def node_suffix(device: str) -> str:
    """``cuda:1`` names a worker ``KIND@gpu1``; a CPU worker is ``KIND@cpu``."""
    if device.startswith("cuda"):
        return "gpu" + (device.split(":", 1)[1] if ":" in device else "0")
    return device
