"""Prefect tasks: thin wrappers over ``denoiser`` with retries, caching,
result persistence and artifacts. One module per pipeline step."""
