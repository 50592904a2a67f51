"""How ids are written, for people and for Slurm (pure)."""

from __future__ import annotations

from collections.abc import Iterable


def format_ids(ids: Iterable[int] | None) -> str:
    """[2, 3] -> '2,3' (none: 'none'): GPU ids as people and Slurm write them."""
    return ",".join(str(i) for i in sorted(ids)) if ids else "none"


def job_id_of(job: str) -> str:
    """The id scontrol takes: "job_123" -> "123"; a 26.05 SLUID ("s5K1KKYAYG5D00") -> itself."""
    if job.startswith("job_") and job[4:].isdigit():
        return job[4:]
    return job
