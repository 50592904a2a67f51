"""The model catalog: YAML files and *.env profile directories, and every way they can be wrong.
Each error is one line that names the file, the model and the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from watchdog_llm.config import Settings
from watchdog_llm.coordination.catalog import CatalogError, Defaults, load
from watchdog_llm.placement import Group
from watchdog_llm.supervise.specs import load_catalog, model_argv, model_spec

D = Defaults(gpus=1, health_path="/health", startup_timeout=900.0)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield  # no processes here


def yaml_catalog(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.yaml"
    p.write_text(text)
    return p


def error(tmp_path: Path, text: str, default: str = "") -> str:
    with pytest.raises(CatalogError) as e:
        load(str(yaml_catalog(tmp_path, text)), default, D)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_yaml_catalog_with_defaults_aliases_env_and_the_default(tmp_path: Path) -> None:
    p = yaml_catalog(
        tmp_path,
        """
default: big
models:
  - name: small
    model: Qwen/Qwen2.5-7B-Instruct
    args: --max-model-len 8192 --gpu-memory-utilization 0.9
  - name: big
    aliases: [llama, l70]
    model: /models/llama-70b
    args: ["--max-model-len", 4096]
    gpus: 4
    env: {HF_HUB_OFFLINE: 1}
    startup_timeout: 1800
    description: for the afternoon
""",
    )
    cat = load(str(p), "", D)
    assert cat.default == "big"
    small, big = cat.entries
    assert small.args == ("--max-model-len", "8192", "--gpu-memory-utilization", "0.9")
    assert small.gpus == 1 and small.startup_timeout == 900.0 and small.health_path == "/health"
    assert big.args == ("--max-model-len", "4096") and big.env == {"HF_HUB_OFFLINE": "1"}
    assert cat.resolve("LLAMA") is big and cat.resolve("l70") is big and cat.resolve("nope") is None
    assert big.local_path == Path("/models/llama-70b") and small.local_path is None
    assert load(str(p), "small", D).default == "small"  # DEFAULT_MODEL wins over the file's default
    s = Settings(_env_file=None, model_name="", models=str(p), num_gpus=1)  # type: ignore[call-arg]
    argv = model_argv(s, "/bin/vllm", big)
    assert argv[:5] == ["/bin/vllm", "serve", "/models/llama-70b", "--tensor-parallel-size", "4"]
    spec = model_spec(s, "/bin/vllm", lambda: "k", big)
    assert spec.env["HF_HUB_OFFLINE"] == "1"


def test_a_mapping_of_names_is_a_catalog_too(tmp_path: Path) -> None:
    cat = load(str(yaml_catalog(tmp_path, "a: {model: org/a}\nb: {model: org/b, gpus: 2}\n")), "", D)
    assert [e.name for e in cat.entries] == ["a", "b"] and cat.default == "a"


def test_without_models_the_config_model_is_a_one_model_catalog() -> None:
    s = Settings(_env_file=None, model_name="Qwen/Qwen2.5-7B-Instruct", vllm_args="--max-model-len 4096")  # type: ignore[call-arg]
    cat = load_catalog(s)
    assert [(e.name, e.model, e.args) for e in cat.entries] == [
        ("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", ("--max-model-len", "4096"))
    ]
    with pytest.raises(CatalogError, match="MODEL_NAME is empty"):
        load_catalog(Settings(_env_file=None))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models: [{name: a, model: x}, {name: b, model: y, aliases: [A]}]", "alias 'A' is already used by model 'a'"),
        ("models: [{name: a, model: x}, {name: a, model: y}]", "name 'a' is already used"),
        ("models:\n  - name: a\n    model: x\n   bad: indent", "not valid YAML (line 4"),
        ("models: [{name: a, model: x, gpu: 2}]", "model 'a': unknown field 'gpu'"),
        ("models: [{name: a, model: x, gpus: -1}]", "model 'a': gpus:"),
        ("models: [{name: a, model: x, gpus: 1.5}]", "model 'a': gpus:"),
        ("models: [{name: a, model: x, startup_timeout: .inf}]", "model 'a': startup_timeout:"),
        ("models: [{name: a, model: x, args: '--port 9000'}]", "model 'a': args: --port is not allowed"),
        ("models: [{name: a, model: x, args: '--api-key=s3cret'}]", "model 'a': args: --api-key is not allowed"),
        ("models: [{name: a, model: x, args: 'unclosed \"quote'}]", "model 'a': args: expected shell-quoted"),
        ("models: [{name: a, model: x, env: {CUDA_VISIBLE_DEVICES: '0'}}]", "env: CUDA_VISIBLE_DEVICES is set by"),
        ("models: [{name: a, model: x, env: {'1BAD': v}}]", "env: '1BAD' is not a valid"),
        ("models: [{name: 'a/b', model: x}]", "name:"),
        ("models: [{name: a}]", "model 'a': model:"),
        ("models: [{name: a, model: x, health_path: health}]", "health_path:"),
        ("models: 5", "expected a list of models"),
        ("models: [{name: a, model: x}]\nextra: 1", "unknown top-level key 'extra'"),
        ("default: zz\nmodels: [{name: a, model: x}]", "default 'zz' is not one of its models"),
        ("models: []", "the catalog is empty"),
        ("models: [{name: a, model: x, kind: [chat, video]}]", "model 'a': kind: expected one or more of chat,"),
        ("models: [{name: a, model: x, gpu_memory: 0}]", "model 'a': gpu_memory: expected MiB per GPU"),
        ("models: [{name: a, model: x, gpu_memory: 1.5}]", "model 'a': gpu_memory:"),
        ("models: [{name: a, model: x, gpu_memory: lots}]", "model 'a': gpu_memory:"),
        ("models: [{name: a, model: x, ttl: 0}]", "model 'a': ttl: expected idle seconds"),
        ("models: [{name: a, model: x, sleep: 3}]", "model 'a': sleep: expected 0 (stop when evicted), 1 or 2"),
        ("models: [{name: a, model: x, priority: high}]", "model 'a': priority:"),
        ("models: [{name: a, model: x, max_concurrency: 0}]", "model 'a': max_concurrency:"),
        ("models: [{name: a, model: x, group: 'a b'}]", "model 'a': group:"),
        (
            "models: [{name: a, model: x, group: g}]\ngroups: {g: {swap: yes-please}}",
            "group 'g': swap: expected true or false",
        ),
        ("models: [{name: a, model: x, group: g}]\ngroups: {g: {members: [a]}}", "group 'g': unknown field 'members'"),
        ("models: [{name: a, model: x, group: g}]\ngroups: {h: {swap: false}}", "group 'h': no model names it"),
        ("models: [{name: a, model: x}]\ngroups: [g]", "groups: expected a mapping"),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000'}]",
            "model 'a': start: a remote entry needs the command",
        ),
        ("models: [{name: a, model: x, base_url: 'http://h:1'}]", "model 'a': base_url: only for an entry that runs"),
        ("models: [{name: a, model: x, stop: [x]}]", "model 'a': stop: only for an entry that runs on another host"),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://h:1/v1', start: x}]",
            "model 'a': base_url: expected where",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: 'run {image}'}]",
            "start: unknown placeholder {image}",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: 'run --x={args}'}]",
            "start: {args} stands for several words",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: [run, true]}]",
            "start: a word is a YAML true/false",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: run, logs: []}]",
            "model 'a': logs: expected a command",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: run, env: {K: \"a\\nb\"}}]",
            "env: K: a remote entry's values",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: run, args: '--api-key k'}]",
            "args: --api-key is not allowed",
        ),
        (
            "models: [{name: a, model: x, host: h, base_url: 'http://10.0.0.2:8000', start: run}]",
            "host: 'h' is not in hosts: (none: add a hosts: section)",
        ),
        (
            "hosts: {h: {address: 10.0.0.2, user: lab}}\n"
            "models: [{name: a, model: x, host: g, base_url: 'http://g:1', start: run}]",
            "host: 'g' is not in hosts: (h)",
        ),
    ],
)
def test_bad_catalogs_name_the_file_the_model_and_the_field(tmp_path: Path, text: str, where: str) -> None:
    msg = error(tmp_path, text)
    assert where in msg, msg
    assert "models.yaml" in msg


def test_a_remote_entry_keeps_its_commands_as_words_and_fills_in_its_values(tmp_path: Path) -> None:
    from watchdog_llm.coordination.catalog import fill

    cat = load(
        str(
            yaml_catalog(
                tmp_path,
                "hosts: {spark-1: {address: 10.0.0.21, user: lab}}\n"
                "models:\n"
                "  - {name: local, model: /models/a}\n"
                "  - name: qwen\n"
                "    model: 'Qwen/Qwen3-8B; rm -rf ~'\n"  # a word, never a command
                "    host: spark-1\n"
                "    base_url: http://10.0.0.21:8000/\n"
                "    start: docker run -d --name 'vllm {name}' img --model={model} {args} --port 8000\n"
                "    stop: [docker, rm, -f, 'vllm {name}']\n"
                "    args: [--max-model-len, 8192]\n",
            )
        ),
        "",
        D,
    )
    local, qwen = cat.entries
    assert local.remote is None and local.host is None
    r = qwen.remote
    assert r is not None and qwen.host == "spark-1" and r.base_url == "http://10.0.0.21:8000"  # no trailing /
    assert fill(r.start, qwen) == [
        "docker", "run", "-d", "--name", "vllm qwen", "img", "--model=Qwen/Qwen3-8B; rm -rf ~",
        "--max-model-len", "8192", "--port", "8000",
    ]  # fmt: skip
    assert fill(r.stop, qwen) == ["docker", "rm", "-f", "vllm qwen"] and r.logs == ()
    assert qwen.public()["host"] == "spark-1" and qwen.public()["stop"] == ["docker", "rm", "-f", "vllm {name}"]
    assert local.public()["host"] is None


def test_unknown_default_model_names_the_catalog(tmp_path: Path) -> None:
    msg = error(tmp_path, "models: [{name: a, model: x}, {name: b, model: y}]", default="c")
    assert msg == "DEFAULT_MODEL='c' is not in the catalog (a, b)"


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such file or directory"):
        load(str(tmp_path / "nope.yaml"), "", D)


def test_env_profiles_are_data_never_run_by_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    profiles = tmp_path / "models"
    profiles.mkdir()
    (profiles / "qwen.env").write_text(
        "# predecessor profile\n"
        "export MODEL_NAME=Qwen/Qwen2.5-7B-Instruct\n"
        'VLLM_ARGS="--max-model-len 8192"\n'
        "NUM_GPUS=2\n"
        f"HF_HOME=$(touch {marker})\n"
        f"OTHER=`touch {marker}`\n"
        "TOKENIZERS_PARALLELISM=${HOME}\n"
    )
    (profiles / "tiny.env").write_text("MODEL_NAME=org/tiny\nALIASES=t, small\n")
    (profiles / "notes.txt").write_text("not a profile")
    cat = load(str(profiles), "t", D)
    assert [e.name for e in cat.entries] == ["qwen", "tiny"] and cat.default == "tiny"
    q = cat.get("qwen")
    assert q.model == "Qwen/Qwen2.5-7B-Instruct" and q.args == ("--max-model-len", "8192") and q.gpus == 2
    assert q.env["HF_HOME"] == f"$(touch {marker})"  # the text, as written
    assert q.env["OTHER"] == f"`touch {marker}`" and q.env["TOKENIZERS_PARALLELISM"] == "${HOME}"
    assert not marker.exists()
    assert cat.get("small").name == "tiny"


def test_env_profile_without_model_name_or_with_a_bad_line(tmp_path: Path) -> None:
    profiles = tmp_path / "p"
    profiles.mkdir()
    (profiles / "x.env").write_text("VLLM_ARGS=--foo\n")
    with pytest.raises(CatalogError, match=r"x\.env: MODEL_NAME is missing"):
        load(str(profiles), "", D)
    (profiles / "x.env").write_text("MODEL_NAME=m\nNUM_GPUS=lots\n")
    with pytest.raises(CatalogError, match=r"x\.env: gpus:"):
        load(str(profiles), "", D)
    (profiles / "x.env").unlink()
    with pytest.raises(CatalogError, match=r"no \*\.env profiles"):
        load(str(profiles), "", D)


def test_the_coordination_core_imports_nothing_of_the_daemon_or_the_http_layer() -> None:
    """Other controllers embed `watchdog_llm.coordination`: it must come without the daemon."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, watchdog_llm.coordination as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('watchdog_llm.coordination.' + m.name)\n"
        "bad = ('watchdog_llm.app', 'watchdog_llm.http', 'watchdog_llm.policy', 'watchdog_llm.config',\n"
        "       'watchdog_llm.supervise.child', 'fastapi', 'uvicorn', 'starlette')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_arbiters_fields_and_groups(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(
        """\
models:
  - name: chat
    model: Qwen/Qwen2.5-7B-Instruct
    gpu_memory: 0.45
    ttl: 600
    group: llms
    sleep: 1
    priority: 2
  - name: coder
    model: Qwen/Qwen2.5-Coder-7B-Instruct
    gpu_memory: 36000
    group: llms
    max_concurrency: 8
  - name: embed
    model: BAAI/bge-m3
    kind: embeddings
    gpu_memory: 10%
    group: always
  - name: whisper
    model: openai/whisper-large-v3
    kind: [transcription]
groups:
  always: {persistent: true, swap: false}
"""
    )
    cat = load(str(f), "", D)
    chat, coder, embed, whisper = cat.entries
    assert (chat.gpu_memory, chat.ttl, chat.group, chat.sleep, chat.priority) == (0.45, 600.0, "llms", 1, 2)
    assert chat.memory_mib(81559) == 36701 and coder.memory_mib(81559) == 36000 and whisper.memory_mib(81559) is None
    assert chat.kind == ("chat", "completions") and embed.kind == ("embeddings",) and whisper.kind == ("transcription",)
    assert embed.gpu_memory == 0.1 and coder.max_concurrency == 8 and coder.sleep == 0
    # A group no `groups:` entry describes gets llama-swap's defaults: one member at a time.
    assert cat.groups["llms"] == Group("llms", swap=True, exclusive=False, persistent=False)
    assert cat.groups["always"] == Group("always", swap=False, exclusive=False, persistent=True)
    assert embed.public()["kind"] == ["embeddings"] and chat.public()["gpu_memory"] == 0.45


def test_env_profiles_carry_the_arbiters_fields(tmp_path: Path) -> None:
    (tmp_path / "chat.env").write_text(
        "MODEL_NAME=org/chat\nGPU_MEMORY=40000\nTTL=300\nSLEEP=2\nGROUP=llms\nKIND=chat\n"
    )
    e = load(str(tmp_path), "", D).entries[0]
    assert (e.gpu_memory, e.ttl, e.sleep, e.group, e.kind, dict(e.env)) == (40000, 300.0, 2, "llms", ("chat",), {})
