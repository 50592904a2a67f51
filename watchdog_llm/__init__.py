"""watchdog-llm: serve an LLM on idle GPUs, yield to Slurm jobs, come back when free."""

__version__ = "0.1.0"
