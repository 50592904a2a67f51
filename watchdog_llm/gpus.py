"""Which GPUs are ours, and how jobs are judged against them: decided once at start-up.

Inputs are the settings, what the GPU view (NVML or its stand-in) reports, and the environment
(Slurm tells a job its GPUs in SLURM_JOB_GPUS). GPUs are named by their physical id, the number
Slurm's GRES IDX uses (/dev/nvidia<N>, NVML's minor number); CUDA_VISIBLE_DEVICES wants NVML
indices, which `cuda_env` maps to.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.base.vocab import YieldOn
from watchdog_llm.config import Settings, parse_id_list
from watchdog_llm.detect.gpu import GpuError, GpuView


class GpuSetupError(Exception):
    """The GPU settings cannot work on this node; one line naming the setting."""


@dataclass(frozen=True, slots=True)
class GpuPlan:
    all_gpus: frozenset[int] | None = None  # GPUs we may choose from (None: we do not choose)
    fixed_gpus: frozenset[int] | None = None  # ours, given (GPU_IDS or the job's), never chosen
    yield_on: YieldOn = YieldOn.ANY  # effective: ANY or OVERLAP
    set_visible: bool = False  # we set CUDA_VISIBLE_DEVICES (outside Slurm); inside a job Slurm did
    index_of: Mapping[int, int] = field(default_factory=dict)  # physical id -> NVML index
    notes: tuple[str, ...] = ()  # what to log once at start-up
    allocated: bool = False  # ours come from Slurm's allocation: no other job can be given them

    @property
    def aware(self) -> bool:
        return self.all_gpus is not None or self.fixed_gpus is not None

    def cuda_env(self, gpus: frozenset[int] | None) -> dict[str, str]:
        """The environment that pins a run to `gpus` (nothing when Slurm or the user pinned it)."""
        if not self.set_visible or gpus is None:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(self.index_of.get(g, g)) for g in sorted(gpus))}


def plan(s: Settings, view: GpuView | None, environ: Mapping[str, str], log: logging.Logger) -> GpuPlan:
    notes: list[str] = []
    in_job = bool(environ.get("SLURM_JOB_ID"))
    index_of: dict[int, int] = {}
    present: frozenset[int] | None = None
    if view is not None:
        try:
            gpus = view.gpus()
        except GpuError as e:
            notes.append(f"GPU: cannot list GPUs ({e}): GPU features off")
            gpus = []
            view = None
        index_of = {g.minor: g.index for g in gpus}
        present = frozenset(index_of) if view is not None else None

    fixed: frozenset[int] | None = None if in_job else s.gpu_id_set
    set_visible = fixed is not None
    allocated = False
    if in_job:
        # Slurm chose our GPUs and set CUDA_VISIBLE_DEVICES for them: never choose others, or we
        # could take GPUs allocated to nobody (or to someone else) where devices are not constrained.
        if s.gpu_id_set is not None:
            notes.append("inside a Slurm job GPU_IDS is ignored: the job's own GPUs are used")
        job_gpus = environ.get("SLURM_JOB_GPUS") or environ.get("SLURM_STEP_GPUS") or ""
        try:
            fixed = frozenset(parse_id_list(job_gpus)) or None
        except ValueError:
            notes.append(f"SLURM_JOB_GPUS={job_gpus!r} is not a GPU list: our GPUs are unknown")
        if fixed is not None:
            allocated = True
            notes.append(f"inside Slurm job {environ['SLURM_JOB_ID']}: our GPUs are {_ids(fixed)} (SLURM_JOB_GPUS)")
        else:
            notes.append("inside a Slurm job without GPUs given (SLURM_JOB_GPUS): our GPUs are unknown")
    if fixed is not None:
        if present is not None and not in_job and (missing := fixed - present):
            raise GpuSetupError(f"GPU_IDS={s.gpu_ids!r}: no GPU {_ids(missing)} on this node (found {_ids(present)})")
        if s.num_gpus != len(fixed):
            what = "the job's GPUs (SLURM_JOB_GPUS)" if in_job else f"GPU_IDS={s.gpu_ids!r}"
            raise GpuSetupError(f"{what} names {len(fixed)} GPU(s) but NUM_GPUS={s.num_gpus}: make them agree")
        all_gpus = None
    elif in_job:
        all_gpus = None
    elif environ.get("CUDA_VISIBLE_DEVICES") is not None:
        notes.append("CUDA_VISIBLE_DEVICES is set: the model uses it as is; our GPUs are unknown")
        all_gpus = None
    else:
        all_gpus = present
        if all_gpus is not None and len(all_gpus) < s.num_gpus:
            raise GpuSetupError(f"NUM_GPUS={s.num_gpus} but this node has {len(all_gpus)} GPU(s)")
        set_visible = all_gpus is not None

    aware = all_gpus is not None or fixed is not None
    yield_on = YieldOn.OVERLAP if aware else YieldOn.ANY
    if s.yield_on is YieldOn.ANY:
        yield_on = YieldOn.ANY
    elif s.yield_on is YieldOn.OVERLAP and not aware:
        notes.append("YIELD_ON=overlap needs our GPUs (NVML, GPU_IDS or SLURM_JOB_GPUS): yielding to every job")
    return GpuPlan(all_gpus, fixed, yield_on, set_visible, index_of, tuple(notes), allocated)
