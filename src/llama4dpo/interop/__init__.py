"""Conversion to and from other frameworks' formats."""

from .hf import export_hf, import_hf
