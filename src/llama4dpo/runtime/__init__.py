"""Where and how the model runs, apart from what it computes: devices and precision (device.py), compiled
decoding into static KV caches (decoder.py). Training and inference both take these from here."""

from .decoder import Decoder
from .device import autocast, resolve_device

__all__ = ["Decoder", "autocast", "resolve_device"]
