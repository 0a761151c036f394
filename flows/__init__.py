"""Prefect flows (wiring only) and the ``denoise`` command line."""
