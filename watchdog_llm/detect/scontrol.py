"""Which GPUs a Slurm job holds on this node, from `scontrol show job -d <id>`.

The detail lines (one per group of nodes with the same allocation) carry the GRES indices:

    Nodes=node-06 CPU_IDs=10-11,15,21 Mem=81920 GRES_IDX=gpu(IDX:0,2-3,5)     (Slurm <= 19.05)
    Nodes=H CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:0-1)                               (20.02 and later)
    Nodes=n[1-2] CPU_IDs=0-7 Mem=0 GRES=gpu:h200:2(IDX:0-1)                   (typed GPUs)
    Nodes=node-005 CPU_IDs=14-15 Mem=1024 GRES=gg:g0(CNT:1),gpu:1(IDX:3)       (several GRES)

IDX is the node-local GRES index, which follows gres.conf's File= order (PCI bus order with
AutoDetect=nvml): the device minor, not necessarily the NVML/CUDA index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from watchdog_llm.base.ids import job_id_of

_NODES = re.compile(r"(?:^|\s)Nodes=(\S+)")
_GRES = re.compile(r"(?:^|\s)GRES(?:_IDX)?=(\S*)")
_IDX = re.compile(r"\(IDX:([^)]*)\)")
MAX_RANGE = 65536  # a hostlist or IDX range wider than this is junk, not a cluster


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets/parentheses ("a[1,2],b" -> ["a[1,2]", "b"])."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def _ranges(text: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"], keeping the zero padding of each range's start."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not sep:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        first, last = int(lo), int(hi)  # ValueError on junk: the caller counts the job as unknown
        if not 0 <= last - first <= MAX_RANGE:
            raise ValueError(f"range {part!r} out of bounds")
        out.extend(str(n).zfill(width) for n in range(first, last + 1))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Slurm hostlist expression -> host names: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5."""
    hosts: list[str] = []
    for item in _split_top(expr.strip()):
        m = re.search(r"\[([^\]]*)\]", item)
        if m is None:
            hosts.append(item)
            continue
        head, tail = item[: m.start()], item[m.end() :]
        for mid in _ranges(m.group(1)):
            hosts.extend(expand_hostlist(head + mid + tail))  # further bracket groups, if any
    return hosts


def _gpu_indices(gres: str) -> frozenset[int]:
    """GPU indices in a detail line's GRES value; other GRES types (shard, mps, license-like) ignored."""
    out: set[int] = set()
    for item in _split_top(gres):
        if re.split(r"[:(]", item, maxsplit=1)[0] != "gpu":
            continue
        m = _IDX.search(item)
        if m is None or m.group(1) in ("", "N/A"):
            continue
        for n in _ranges(m.group(1)):
            if n.isdigit():
                out.add(int(n))
    return frozenset(out)


def _same_host(a: str, b: str) -> bool:
    # scontrol prints NodeName; our hostname may be the FQDN or the short name, in another case.
    a, b = a.lower(), b.lower()
    return a == b or a.split(".", 1)[0] == b.split(".", 1)[0]


def parse_job_gpus(text: str, node: str | None) -> frozenset[int] | None:
    """GPU indices (Slurm GRES IDX) `scontrol show job -d` text gives the job on `node`.

    We only ask about jobs whose cgroups are on this node, so a job's only detail line is ours
    whatever name it uses (Slurm's NodeName need not be our host name). With several lines, the one
    naming `node` (node None: the first). frozenset(): no GPUs here. None: the text does not say
    (hidden by PrivateData, an error, no detail lines as for a pending job, or no line names us).
    Raises ValueError on malformed ranges.
    """
    details = [(m.group(1), line) for line in text.splitlines() if (m := _NODES.search(line)) and "CPU_IDs=" in line]
    if not details:
        return None  # `NodeList=`/`NumNodes=` lines are not detail lines
    if node is not None and len(details) > 1:
        details = [(hosts, line) for hosts, line in details if any(_same_host(h, node) for h in expand_hostlist(hosts))]
        if not details:
            return None  # several nodes, none of them us: our node name is not Slurm's
    gpus: set[int] = set()
    for _, line in details[:1] if node is None else details:
        if (g := _GRES.search(line)) is not None:
            gpus |= _gpu_indices(g.group(1))
    return frozenset(gpus)


class Scontrol:
    """GPUs of jobs via `scontrol show job -d`, one query per job, cached (failures too)."""

    def __init__(self, binary: str, timeout: float, node: str | None, log: logging.Logger) -> None:
        self._binary = binary
        self._timeout = timeout
        self._node = node
        self._log = log
        self._cache: dict[str, frozenset[int] | None] = {}
        # A job seen twice while its first query runs shares that query: one scontrol per job.
        self._inflight: dict[str, asyncio.Future[frozenset[int] | None]] = {}
        self._forgotten: dict[str, int] = {}  # forget() count per job: a query it overtook is not cached

    async def job_gpus(self, job: str) -> frozenset[int] | None:
        """GPU indices of `job` on our node; None when scontrol cannot say (one log line why)."""
        key = job_id_of(job)
        if key in self._cache:
            return self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await self._join(job, pending)
        fut: asyncio.Future[frozenset[int] | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        generation = self._forgotten.get(key, 0)
        try:
            result = await self._query(key)
        except BaseException:  # only cancellation gets here: _query reports every failure as None
            fut.cancel()
            raise
        finally:
            del self._inflight[key]
        if self._forgotten.get(key, 0) == generation:  # the job ended meanwhile: a requeue reuses its id
            self._cache[key] = result
        fut.set_result(result)
        return result

    async def _join(self, job: str, pending: asyncio.Future[frozenset[int] | None]) -> frozenset[int] | None:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we were cancelled ourselves
            return await self.job_gpus(job)  # the query we joined was cancelled: run our own

    def forget(self, job: str) -> None:
        key = job_id_of(job)
        self._cache.pop(key, None)
        if key in self._inflight:
            self._forgotten[key] = self._forgotten.get(key, 0) + 1

    async def _query(self, job_id: str) -> frozenset[int] | None:
        out, why = await self._run(job_id)
        if out is None:
            self._log.warning("scontrol: job %s: %s", job_id, why)
            return None
        try:
            gpus = parse_job_gpus(out, self._node)
        except ValueError as e:
            self._log.warning("scontrol: job %s: cannot read its GPUs (%s): counting them as unknown", job_id, e)
            return None
        if gpus is None:
            first = out.strip().splitlines()[0][:160] if out.strip() else "empty output"
            self._log.info("scontrol: job %s: its GPUs are not shown (PrivateData?): %s", job_id, first)
        return gpus

    async def _run(self, job_id: str) -> tuple[str | None, str]:
        """(stdout, "") or (None, why). Kills only the scontrol process it started."""
        argv = [self._binary, "show", "job", "-d", job_id]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except OSError as e:
            return None, f"cannot run {self._binary}: {e.strerror or e}"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            return None, f"{self._binary} did not answer within {self._timeout:g} s (killed)"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await proc.wait()
        if proc.returncode != 0:
            text = (err or out).decode(errors="replace").strip().splitlines()
            return None, f"{self._binary} exited {proc.returncode}: {text[0][:160] if text else 'no output'}"
        return out.decode(errors="replace"), ""
