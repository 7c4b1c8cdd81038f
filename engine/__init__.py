"""Kontext engine: build and run FLUX.1 Kontext [dev] fast. Importing this module does no work."""

__version__ = "0.1.0"
