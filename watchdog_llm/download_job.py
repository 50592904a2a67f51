"""One model download with `huggingface_hub`, for POST /api/downloads and `watchdog-llm download`.

It runs here (`python -m watchdog_llm.download_job REPO REVISION`) or on a model host
(`python3 -c "<this file>" REPO REVISION`, over SSH), so it imports nothing of watchdog_llm: only the
standard library and the hub's client, which honours HF_ENDPOINT, HF_TOKEN and HF_HOME as it always
does. It downloads into the hub's cache, where `vllm serve ORG/NAME` finds the model, and a second
run resumes what an interrupted one left (the client keeps `.incomplete` files).

It speaks JSON lines on stdout:
  {"event": "plan", "total": bytes, "have": bytes already cached, "files": n, "commit": sha}
  {"event": "progress", "bytes": bytes on disk of the total}          (four times a second)
  {"event": "done", "path": the snapshot directory}
  {"event": "error", "code": ..., "message": one line}                (then exit status 4 or 5)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import threading
from typing import Any


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def size_of(directory: str) -> int:
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        with contextlib.suppress(OSError):  # renamed from .incomplete as we looked
            total += e.stat(follow_symlinks=False).st_size
    return total


def _fail(code: str, message: str, status: int) -> int:
    emit(event="error", code=code, message=" ".join(message.split())[:500])
    return status


def main(argv: list[str]) -> int:
    repo, revision = argv[0], (argv[1] if len(argv) > 1 and argv[1] else None)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our progress is on stdout, as JSON
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import DryRunError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.file_download import repo_folder_name
    except ImportError as e:
        return _fail("no_hub_client", f"huggingface_hub is not installed for {sys.executable} ({e})", 4)
    # The client writes (and so shows progress) every DOWNLOAD_CHUNK_SIZE, 10 MiB: a MiB is finer for
    # people watching, and costs a large download nothing measurable.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1024 * 1024)
    at = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    try:
        try:
            plan = snapshot_download(repo, revision=revision, dry_run=True)
        except DryRunError as e:  # it wraps the hub's answer about the repo: look at that
            raise (e.__cause__ if isinstance(e.__cause__, Exception) else e) from None
    except GatedRepoError:
        return _fail("gated", f"{repo} is gated on {at}: HF_TOKEN must be a token with access to it", 4)
    except RevisionNotFoundError:
        return _fail("revision_not_found", f"{repo} has no revision {revision!r} on {at}", 4)
    except RepositoryNotFoundError:
        return _fail("repo_not_found", f"{repo} is not on {at} (or it is private: set HF_TOKEN)", 4)
    except Exception as e:  # the hub down, a proxy, a timeout: the client's own words, on one line
        return _fail("hub_error", f"the hub at {at}: {e}", 5)
    total = sum(i.file_size or 0 for i in plan)
    have = sum(i.file_size or 0 for i in plan if not i.will_download)
    emit(event="plan", total=total, have=have, files=len(plan), commit=plan[0].commit_hash if plan else None)
    blobs = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"), "blobs")
    base = size_of(blobs)  # what was cached before (the files it had are in `have`)
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.25):
            emit(event="progress", bytes=min(total, have + max(0, size_of(blobs) - base)))

    threading.Thread(target=report, daemon=True).start()
    try:
        path = snapshot_download(repo, revision=revision)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return _fail("disk_full", f"no space left on the device of {constants.HF_HUB_CACHE}", 5)
        return _fail("download_failed", f"{type(e).__name__}: {e}", 5)
    except Exception as e:
        return _fail("download_failed", f"{type(e).__name__}: {e}", 5)
    finally:
        done.set()
    emit(event="progress", bytes=total)
    emit(event="done", path=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
