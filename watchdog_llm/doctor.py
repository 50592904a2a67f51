"""`watchdog-llm doctor`: check everything the daemon needs, one line per check, before running it."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TextIO

from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.base.vocab import NotifyKind
from watchdog_llm.config import Settings, misspelled_env
from watchdog_llm.coordination.catalog import Catalog
from watchdog_llm.detect import DetectError, make_detector
from watchdog_llm.detect.slurm import own_jobs
from watchdog_llm.detect.stale import hides_processes
from watchdog_llm.supervise.probes import port_in_use
from watchdog_llm.supervise.specs import model_argv, resolve_bin


class Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failures = 0

    def ok(self, msg: str) -> None:
        print(f"ok    {msg}", file=self.out)

    def warn(self, msg: str) -> None:
        print(f"warn  {msg}", file=self.out)

    def fail(self, msg: str) -> None:
        self.failures += 1
        print(f"FAIL  {msg}", file=self.out)

    def info(self, msg: str) -> None:
        print(f"      {msg}", file=self.out)


def run_doctor(s: Settings, *, send: bool, out: TextIO, environ: dict[str, str]) -> bool:
    r = Report(out)
    r.ok(f"config parsed ({s.config_file or 'no config file: environment and defaults only'})")
    for typo in misspelled_env(environ):
        r.warn(typo)
    _state_dir(r, s.state_dir)
    catalog = _model(r, s)
    _gateway(r, s)
    _tunnel(r, s)
    _detection(r, s, environ)
    ours = _gpus(r, s, environ)
    if catalog is not None:
        _catalog_gpus(r, catalog, ours)
        _hosts(r, s, catalog)
    _notifications(r, s, send)
    print(f"{'all checks passed' if not r.failures else f'{r.failures} check(s) failed'}", file=out)
    return r.failures == 0


def _state_dir(r: Report, path: Path) -> None:
    from watchdog_llm.app import StartupError, prepare_state_dir

    try:
        prepare_state_dir(path)
        r.ok(f"STATE_DIR {path} is writable")
    except StartupError as e:
        r.fail(str(e))


def _model(r: Report, s: Settings) -> Catalog | None:
    """LLM_BIN, the model catalog (MODELS, or MODEL_NAME alone) and SERVER_PORT; returns the catalog."""
    from watchdog_llm.coordination.catalog import CatalogError
    from watchdog_llm.supervise.specs import load_catalog

    catalog: Catalog | None = None
    try:
        catalog = load_catalog(s)
    except CatalogError as e:
        for problem in e.problems:
            r.fail(problem)
    llm = resolve_bin(s.llm_bin)
    if llm is None:
        r.fail(f"LLM_BIN={s.llm_bin!r} not found or not executable")
    else:
        r.ok(f"LLM_BIN {llm}")
    if catalog is not None:
        _catalog(r, s, catalog, llm)
    sock = s.model_socket
    if sock is not None:
        r.ok(f"SERVER_SOCKET {sock}: vLLM listens there (vllm serve --uds); no TCP port")
    elif port_in_use(s.server_host, s.server_port):
        r.warn(f"SERVER_PORT {s.server_port} is in use now (by us if the daemon runs; else the model takes another)")
    else:
        r.ok(f"SERVER_PORT {s.server_port} is free (SERVER_SOCKET=off: other users of the node can reach vLLM's port)")
    return catalog


def _hosts(r: Report, s: Settings, catalog: Catalog) -> None:
    """Mode C: the controller's key and each host's accepted key (no connection: `hosts check` does that)."""
    if not catalog.hosts:
        return
    from watchdog_llm.remote.ssh import KEY_NAME, fingerprint, known_keys

    key = s.state_dir / "ssh" / KEY_NAME
    (r.ok if key.exists() else r.fail)(
        f"SSH key {key}" + (" exists" if key.exists() else " missing: run `watchdog-llm ssh-key`")
    )
    for h in catalog.hosts.values():
        keys = known_keys(s.state_dir, h)
        if keys:
            r.ok(f"host {h.shown}: host key accepted ({', '.join(fingerprint(k) for k in keys)})")
        else:
            r.fail(f"host {h.shown}: host key not accepted yet: `watchdog-llm hosts accept {h.name}`")


def _catalog(r: Report, s: Settings, catalog: Catalog, llm: str | None) -> None:
    """One line for the catalog, one per model: what it runs, and whether a local model path exists."""
    default = f"default {catalog.default}" + (" (DEFAULT_MODEL)" if s.default_model else "")
    if s.models:
        r.ok(f"MODELS {catalog.source}: {len(catalog.entries)} model(s), {default}")
        if s.model_name or s.vllm_args:
            r.info("MODEL_NAME and VLLM_ARGS are not used: MODELS is the catalog")
    else:
        r.ok(f"model from MODEL_NAME: {catalog.default} (set MODELS for a catalog to swap between)")
    for e in catalog.entries:
        what = f"model {e.name!r}" + (" (default)" if e.name == catalog.default else "")
        aliases = f", aliases {', '.join(e.aliases)}" if e.aliases else ""
        gpus = f"{e.gpus} GPU" + ("" if e.gpus == 1 else "s")
        if (path := e.local_path) is None:
            r.ok(f"{what}: {e.model} (hub id, fetched by vLLM), {gpus}{aliases}")
        elif path.exists():
            r.ok(f"{what}: {path} exists, {gpus}{aliases}")
        else:
            r.fail(f"{what}: local model path {path} does not exist")
        if llm is not None:
            r.info("would run: " + " ".join(model_argv(s, llm, e)))


def _catalog_gpus(r: Report, catalog: Catalog, ours: frozenset[int] | None) -> None:
    """Each model's GPU count against the GPUs that can be ours, when those are known."""
    if ours is None:
        r.info("models' GPU counts not checked: which GPUs can be ours is unknown (no NVML, GPU_IDS or job GPUs)")
        return
    too_many = [e for e in catalog.entries if e.gpus > len(ours)]
    for e in too_many:
        r.fail(f"model {e.name!r} needs {e.gpus} GPU(s); {len(ours)} can be ours (GPU {_ids(ours)})")
    if not too_many:
        r.ok(f"every model fits the {len(ours)} GPU(s) that can be ours (GPU {_ids(ours)})")


def _gateway(r: Report, s: Settings) -> None:
    from watchdog_llm.http.keys import KeyConfigError, KeyRing
    from watchdog_llm.http.server import UNIX_PATH_MAX

    try:
        keys = KeyRing.from_settings(
            s.public_api_keys.get_secret_value(), s.public_api_keys_file, s.api_key.get_secret_value()
        )
    except KeyConfigError as e:
        r.fail(str(e))
    else:
        if keys.open:
            r.warn("no PUBLIC_API_KEYS: the public endpoint would be open to anyone who reaches it")
        else:
            r.ok(f"{len(keys)} public API key(s)")
    if port_in_use(s.public_host, s.public_port):
        r.warn(f"PUBLIC_PORT {s.public_port} is in use now (by us if the daemon runs; else pick another port)")
    else:
        r.ok(f"gateway would listen on {s.public_base_url}")
    if s.admin_host:
        r.ok(f"admin API on {s.admin_host}:{s.admin_port} (token required)")
    elif len(str(s.admin_socket).encode()) > UNIX_PATH_MAX:
        r.fail(f"admin socket path {s.admin_socket} is too long for a unix socket: shorten STATE_DIR or set ADMIN_HOST")
    else:
        r.ok(f"admin API on {s.admin_socket} (mode 0600)")


def _tunnel(r: Report, s: Settings) -> None:
    if not s.tunnel_enabled:
        r.info("tunnel: off (set TUNNEL_TOKEN, TUNNEL_TOKEN_FILE or TUNNEL_ID + CLOUDFLARED_CREDS)")
        return
    cf = resolve_bin(s.cloudflared_bin)
    (r.ok if cf else r.fail)(f"CLOUDFLARED_BIN {cf or repr(s.cloudflared_bin) + ' not found'}")
    for name, value in (("CLOUDFLARED_CREDS", s.cloudflared_creds), ("TUNNEL_TOKEN_FILE", s.tunnel_token_file)):
        if value:
            readable = os.access(value, os.R_OK)
            (r.ok if readable else r.fail)(f"{name} {value} {'is readable' if readable else 'is not readable'}")


def _detection(r: Report, s: Settings, environ: dict[str, str]) -> None:
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        text = ""
    own = own_jobs(environ, text)
    if own:
        r.info(f"inside Slurm job(s) {', '.join(sorted(own))}: never yielding to them")
    log = logging.getLogger("watchdog_llm.doctor")
    if (job_mode := s.detection_mode.jobs) is None:
        r.info(f"DETECTION_MODE={s.detection_mode.value}: Slurm jobs are not watched; only GPU use is")
        return
    try:
        det = make_detector(job_mode, cgroup_root=s.cgroup_root, poll_interval=s.poll_interval, own=own, log=log)
        jobs = det.start(lambda _sig: None)
    except DetectError as e:
        r.fail(f"DETECTION_MODE={s.detection_mode.value}: {e}")
        return
    try:
        r.ok(f"detection ({s.detection_mode.value}) works on {s.cgroup_root}")
        for line in det.describe():
            r.info(line)
        r.info(f"jobs on this node now: {', '.join(sorted(jobs)) or 'none'}")
        if job_mode == "cgroup" and s.stale_job_grace > 0:
            why = hides_processes(Path("/proc"))
            if why is None:
                r.ok(f"job dirs Slurm leaves behind are ignored after {s.stale_job_grace:g} s with no process")
            else:
                r.warn(f"{why}: job dirs Slurm leaves behind would hold the GPUs off (STALE_JOB_GRACE)")
    finally:
        det.stop()


def _gpus(r: Report, s: Settings, environ: dict[str, str]) -> frozenset[int] | None:
    """NVML, and how GPUs would be chosen; returns the GPUs that can be ours (None: unknown)."""
    from watchdog_llm.detect.gpu import GpuError, open_gpu_view
    from watchdog_llm.gpus import GpuSetupError, plan

    # open_gpu_view says why NVML is unusable in one log line: show that line as the warning instead.
    said: list[str] = []
    log = logging.getLogger("watchdog_llm.doctor.gpu")
    log.propagate = False
    handler = _ListHandler(said)
    log.addHandler(handler)
    try:
        view = open_gpu_view(s.gpu_standin, s.nvml_timeout, log)
    finally:
        log.removeHandler(handler)
    if view is None:
        if s.detection_mode.watches_gpus:
            r.fail(f"DETECTION_MODE={s.detection_mode.value} needs NVML: {said[-1] if said else 'unavailable'}")
        else:
            r.warn(said[-1] if said else "GPU: NVML unavailable: GPU features off")
        _yield_on(r, s, None)
        try:  # GPU_IDS (or a job's GPUs) still say which are ours
            blind = plan(s, None, environ, log)
        except GpuSetupError as e:
            r.fail(str(e))
            return None
        return blind.fixed_gpus
    try:
        gpus = view.gpus()
        procs = view.processes()
        gp = plan(s, view, environ, log)
    except GpuError as e:
        r.fail(f"{view.name} is present but failed: {e}")
        return None
    except GpuSetupError as e:
        r.fail(str(e))
        return None
    finally:
        view.close()
    r.ok(f"{len(gpus)} GPU(s) visible through {view.name}")
    for g in gpus:
        r.info(f"GPU {g.index} (minor {g.minor}): {g.name}, {g.memory_total / 2**30:.1f} GiB, {g.pci_bus_id}")
    # Doctor starts no model: every compute process now is foreign (or a leftover of an earlier run).
    busy = sorted({p.minor for p in procs})
    r.info(f"foreign compute processes now: {len(procs)}" + (f" on GPU minor(s) {busy}" if busy else ""))
    for note in gp.notes:
        r.info(note)
    if gp.fixed_gpus is not None:
        r.info(f"ours: GPU {', '.join(map(str, sorted(gp.fixed_gpus)))} (fixed)")
    elif gp.all_gpus is not None:
        r.info(f"ours: {s.num_gpus} chosen at each start from the free ones, highest ids first")
    _yield_on(r, s, gp.yield_on)
    return gp.fixed_gpus if gp.fixed_gpus is not None else gp.all_gpus


def _yield_on(r: Report, s: Settings, effective: str | None) -> None:
    from watchdog_llm.supervise.specs import resolve_bin

    if effective != "overlap":
        r.info(f"YIELD_ON={s.yield_on.value}: every Slurm job on the node takes the GPUs back")
        return
    scontrol = resolve_bin(s.scontrol_bin)
    if scontrol is None:
        r.warn(f"YIELD_ON=overlap needs SCONTROL_BIN={s.scontrol_bin!r}: not found, so every job takes the GPUs back")
    else:
        r.ok(f"YIELD_ON=overlap: a job takes the GPUs back only if `{scontrol} show job -d` puts it on ours")


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


def _notifications(r: Report, s: Settings, send: bool) -> None:
    from watchdog_llm.notify import Message, NotifyConfigError, mask_url, parse_urls, send_once

    urls = s.notify_url_list
    if not urls:
        r.warn("no notifications: set NTFY_TOPIC or NOTIFY_URLS")
        return
    try:
        parse_urls(urls)
    except NotifyConfigError as e:
        r.fail(str(e))
        return
    r.ok(f"{len(urls)} notification URL(s) parse: {', '.join(mask_url(u) for u in urls)}")
    if send:
        msg = Message(NotifyKind.TEST, "watchdog-llm doctor", "test notification from doctor", "low")
        sent = asyncio.run(send_once(urls, msg, log=logging.getLogger("watchdog_llm"), node=s.node_name))
        (r.ok if sent else r.fail)("test notification " + ("sent" if sent else "could not be sent"))
