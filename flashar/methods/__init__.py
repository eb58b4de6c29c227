"""Decoding methods. Each lives in ``methods/<id>.py`` and registers itself through pluggy."""
