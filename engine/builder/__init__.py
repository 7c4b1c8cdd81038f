"""The build step (`kontext build`): export -> calibrate -> golden -> quantize -> compile -> verify,
recorded in a manifest (engine/manifest.py, which the runtime reads to refuse artifacts that do not
match). The runtime never imports this package."""
