"""The coordination core: swap lock, signed webhooks, schedule registry, connectivity log, durable state.

Importable without the daemon or the HTTP layer (no FastAPI, no uvicorn), so other controllers can embed it;
the admin API mounts it.
"""
