"""Where and how the model runs, apart from what it computes: devices and precision (device.py), compiled
decoding into static KV caches (decoder.py), the CPU thread count (threads.py). Training and inference both take these from here."""

from .decoder import Decoder
from .device import autocast, resolve_device
from .threads import ThreadChooser

__all__ = ["Decoder", "ThreadChooser", "autocast", "resolve_device"]
