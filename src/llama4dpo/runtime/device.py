"""Devices and mixed precision."""

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA where there is one, else the CPU; any other name is torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """bf16 autocast for precision "bf16" (weights stay fp32; matmuls run in bf16), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
