"""The build step: export -> quantize -> compile -> verify -> manifest. Never imported by the runtime path
(except manifest.py, which the runtime reads to refuse artifacts that do not match)."""
