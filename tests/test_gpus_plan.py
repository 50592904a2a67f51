"""gpus.plan: which GPUs are ours, decided once from the settings, the GPU view and Slurm's environment."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from watchdog_llm.config import Settings
from watchdog_llm.detect.gpu import StandinView
from watchdog_llm.gpus import GpuSetupError, plan

DATA = Path(__file__).parent / "data" / "gpu" / "h100x4.json"
LOG = logging.getLogger("test.gpus")


@pytest.fixture
def view() -> Iterator[StandinView]:
    v = StandinView(DATA, 5.0, LOG)
    yield v
    v.close()


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, model_name="m", **kw)  # type: ignore[call-arg]


def test_outside_slurm_we_choose_and_pin(view: StandinView) -> None:
    gp = plan(settings(num_gpus=2), view, {}, LOG)
    assert gp.all_gpus == {0, 1, 2, 3} and gp.fixed_gpus is None and gp.yield_on == "overlap"
    assert gp.cuda_env(frozenset({2, 3})) == {"CUDA_VISIBLE_DEVICES": "2,3"} and not gp.allocated


def test_gpu_ids_pin_outside_a_job(view: StandinView) -> None:
    gp = plan(settings(num_gpus=1, gpu_ids="3"), view, {}, LOG)
    assert gp.fixed_gpus == {3} and gp.cuda_env(gp.fixed_gpus) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_inside_a_job_slurm_allocated_ours(view: StandinView) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1,2"}
    gp = plan(settings(num_gpus=2, gpu_ids="0,3"), view, env, LOG)
    assert gp.fixed_gpus == {1, 2} and gp.allocated and gp.all_gpus is None
    assert gp.cuda_env(gp.fixed_gpus) == {}  # Slurm set CUDA_VISIBLE_DEVICES already
    assert any("GPU_IDS is ignored" in n for n in gp.notes)


def test_inside_a_job_without_gpus_we_never_choose_any(view: StandinView) -> None:
    gp = plan(settings(num_gpus=1), view, {"SLURM_JOB_ID": "7"}, LOG)
    assert gp.all_gpus is None and gp.fixed_gpus is None and gp.yield_on == "any"


def test_user_cuda_visible_devices_is_respected(view: StandinView) -> None:
    gp = plan(settings(num_gpus=1), view, {"CUDA_VISIBLE_DEVICES": "0"}, LOG)
    assert not gp.aware and gp.cuda_env(frozenset({3})) == {}


def test_mismatches_are_one_line_errors(view: StandinView) -> None:
    with pytest.raises(GpuSetupError, match=r"SLURM_JOB_GPUS\) names 2 GPU\(s\) but NUM_GPUS=1"):
        plan(settings(num_gpus=1), view, {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0-1"}, LOG)
    with pytest.raises(GpuSetupError, match="no GPU 9"):
        plan(settings(num_gpus=1, gpu_ids="9"), view, {}, LOG)
