"""`python gcs_emulator_main.py start --host ... --port ...`: gcp-storage-emulator, with what the
tests need beyond it (used by tests/gcs_helpers.py and scripts/chaos.py only):

* the response header real GCS sends on every download and TensorStore needs: `x-goog-generation`
  (the emulator omits it; TensorStore's OCDBT reads it to make its conditional manifest writes,
  and fails with "Malformed StorageGeneration" without it);
* the create-if-absent precondition (`ifGenerationMatch=0`, what lock objects rely on): 412 when
  the object exists (the emulator ignores preconditions);
* a resumable upload's final chunk sent again (a client retrying after its answer was lost) is
  answered with the object, as GCS answers (the emulator forgets finished uploads: 404);
* injected faults, for the flaky-store tests: with DOA_GCS_FAULTS=FILE, FILE holds JSON
  `{"seed": 0, "rules": [RULE, ...]}`, reread when it changes. A RULE is
  `{"match": REGEX, "fault": FAULT, "rate": P, "times": N, "after": K}`: requests whose
  `"<METHOD> <handler> <bucket>/<object>"` (e.g. `POST insert doa-test/run/results.jsonl.rows/...`,
  `GET download doa-test/run/cells/...`) the regex searches get FAULT with probability P (default
  1; a seeded generator), at most N times (default no limit), after skipping the first K matches.
  FAULT: an HTTP status (`"429"`, `"503"`, `"403"`, `"404"`, ... with GCS's JSON error body),
  `"reset"` (the connection is reset before the request is served), `"reset_after"` (served, then
  reset: the write landed but the client never hears so), or `"slow:S"` (served after S seconds).
  Each injected fault appends `FAULT<TAB>TARGET` to FILE.log.
"""
import contextlib
import functools
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator.handlers import buckets, objects


def _with_generation(download):
    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:   # not found: the handler already answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return wrapped


def _error(response, code: int, message: str) -> None:
    response.status = HTTPStatus(code)
    response.json({"error": {"code": code, "message": message, "errors": [{"message": message}]}})


def _upload_name(request):
    name = (request.query.get("name") or [None])[0]
    if name is None and request.method == "POST" and (request.query.get("uploadType") or [""])[0] == "multipart":
        name = (request.data or {}).get("meta", {}).get("name")
    return name


def _if_absent(insert):
    """`ifGenerationMatch=0`: create only if absent (412 otherwise), as GCS does."""
    @functools.wraps(insert)
    def wrapped(request, response, storage, *args, **kwargs):
        if (request.query.get("ifGenerationMatch") or [""])[0] == "0":
            name = _upload_name(request)
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except Exception:   # absent: create it
                pass
            else:
                return _error(response, 412, "At least one of the pre-conditions you specified did not hold.")
        return insert(request, response, storage, *args, **kwargs)
    return wrapped


def _finished_uploads(upload_partial):
    finished = {}

    @functools.wraps(upload_partial)
    def wrapped(request, response, storage, *args, **kwargs):
        upload_id = (request.query.get("upload_id") or [""])[0]
        if upload_id in finished:
            response.json(storage.get_file_obj(*finished[upload_id]))
            return None
        obj = None
        with contextlib.suppress(Exception):
            obj = storage.get_resumable_file_obj(upload_id)
        out = upload_partial(request, response, storage, *args, **kwargs)
        if obj is not None and response.status == HTTPStatus.OK:
            finished[upload_id] = (obj["bucket"], obj["name"])
        return out
    return wrapped


class Faults:
    """The rules of DOA_GCS_FAULTS, reread when the file changes, and the log of injected faults."""

    def __init__(self, path):
        self.path, self.mtime, self.rules, self.seen = path, None, [], []
        self.lock = threading.Lock()
        self.rng = random.Random(0)

    def _reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self.rules, self.mtime = [], None
            return
        if mtime != self.mtime:
            with open(self.path) as f:
                spec = json.load(f)
            self.mtime, self.rules = mtime, spec.get("rules", [])
            self.seen = [0] * len(self.rules)
            self.rng = random.Random(spec.get("seed", 0))

    def pick(self, target: str):
        with self.lock:
            self._reload()
            for i, rule in enumerate(self.rules):
                if not re.search(rule["match"], target):
                    continue
                self.seen[i] += 1
                n = self.seen[i] - int(rule.get("after", 0))
                if n < 1 or ("times" in rule and rule.get("fired", 0) >= rule["times"]):
                    continue
                if self.rng.random() >= float(rule.get("rate", 1.0)):
                    continue
                rule["fired"] = rule.get("fired", 0) + 1
                with open(f"{self.path}.log", "a") as log:
                    log.write(f"{rule['fault']}\t{target}\n")
                return rule["fault"]
        return None


def _reset(request) -> None:
    """Resets the client's connection (TCP RST) without an answer."""
    conn = request._request_handler.connection
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.close(conn.detach())   # the fd itself (socket.close waits for the handler's file objects)


def _faulty(handler, faults: Faults):
    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        params = request.params or {}
        name = params.get("object_id") or _upload_name(request) or ""
        fault = faults.pick(f"{request.method} {handler.__name__} {params.get('bucket_name', '')}/{name}")
        if fault is None:
            return handler(request, response, storage, *args, **kwargs)
        if fault.startswith("slow:"):
            time.sleep(float(fault.split(":", 1)[1]))
            return handler(request, response, storage, *args, **kwargs)
        if fault == "reset":
            request.data   # the request was sent whole; the answer never comes
            return _reset(request)
        if fault == "reset_after":
            handler(request, response, storage, *args, **kwargs)
            return _reset(request)
        code = int(fault)
        return _error(response, code, {403: "Forbidden: the caller does not have storage.objects access",
                                       404: "The specified bucket does not exist."}.get(code, HTTPStatus(code).phrase))
    return wrapped


def _patch_handlers() -> None:
    objects.download = _with_generation(objects.download)
    objects.insert = _if_absent(objects.insert)
    objects.upload_partial = _finished_uploads(objects.upload_partial)
    path = os.environ.get("DOA_GCS_FAULTS")
    if not path:
        return
    faults = Faults(path)
    for module, names in ((objects, ("insert", "download", "get", "delete", "ls", "patch", "upload_partial",
                                     "xml_upload", "copy", "rewrite", "compose")),
                          (buckets, ("get", "ls"))):
        for name in names:
            setattr(module, name, _faulty(getattr(module, name), faults))


_patch_handlers()

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: routes bind at import)

if __name__ == "__main__":
    sys.exit(main())
