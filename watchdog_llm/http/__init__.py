"""HTTP: the public gateway (OpenAI-compatible, the tunnel's origin) and the admin API (local only)."""
