"""FTS3-REST test shim for the demo lake: really copies bytes and verifies them. NOT a real FTS.

FTS cannot be installed here, so this speaks the subset of the FTS3 REST API that rucio 41's
fts3 transfertool uses when the RSE attribute `fts` is a plain http:// URL (no client cert):

  POST   /jobs                           submit -> 200 {"job_id": ...}
  GET    /jobs/<id>[,<id>...]?files=...  bulk query (a list when several ids, 207)
  GET    /jobs/<id>/files                file details
  DELETE /jobs/<id>                      cancel
  POST   /jobs/<id>                      priority update (accepted, ignored)
  GET    /whoami, GET /, GET|POST|DELETE /ban/se, GET|POST /config/se   (minimal answers)
  GET    /_knobs                         the test knobs in force (see below)

Every file of a job is copied in a background thread, source URL -> destination URL, for file://,
http(s):// and dav(s):// (dav[s] is spoken as http[s]); HTTP destinations are written with PUT,
missing parent collections are created with MKCOL. Every HTTP request carries the bearer token of
--token-file (re-read each time), as a real FTS presents the credential delegated to it. The size is always verified, adler32/md5 when
rucio asks for it (verify_checksum); a mismatch fails the file with the reason FTS would give.

Test knobs live in a JSON file ({"delay": seconds, "fail": regex or null}) that the shim re-reads
whenever it changes, so tests flip them while the lake stays up (`datalakefs demo knobs`):
  delay  sleep that long before each file copy (makes SUBMITTED/ACTIVE and REPLICATING visible);
  fail   fail every file whose source or destination URL matches the regex, with a reason that
         contains "forced failure by fts-shim".
Jobs are kept in memory and saved to --state at most once a second, so a restarted shim still
answers rucio's poller about transfers it accepted earlier. Standard library only.
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger("fts-shim")
JOBS = {}
LOCK = threading.Lock()
DIRTY = threading.Event()
BASE_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "datalakefs-demo-fts-shim"))
FINAL_FILE = {"FINISHED", "FAILED", "CANCELED", "NOT_USED"}
FINAL_JOB = {"FINISHED", "FINISHEDDIRTY", "FAILED", "CANCELED"}
FORGET_AFTER = 3600.0
TIMEOUT = 120
CHUNK = 1 << 20
TOKEN_FILE = None


class Knobs:
    """The knob file, re-read when its (mtime, size) changes; a missing file means no knobs."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.values = {"delay": 0.0, "fail": None}
        self.lock = threading.Lock()

    def current(self):
        with self.lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self.stamp:
                values = {"delay": 0.0, "fail": None}
                if stamp is not None:
                    try:
                        with open(self.path) as fh:
                            raw = json.load(fh)
                        values = {"delay": float(raw.get("delay") or 0.0), "fail": raw.get("fail") or None}
                    except (OSError, ValueError) as err:
                        LOG.warning("ignoring unreadable knob file %s: %s", self.path, err)
                        values = self.values
                if values != self.values:
                    LOG.info("knobs now %s", values)
                self.stamp, self.values = stamp, values
            return dict(self.values)


KNOBS = Knobs(None)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _saver(path):
    while True:
        DIRTY.wait()
        time.sleep(1.0)
        DIRTY.clear()
        with LOCK:
            cutoff = time.time() - FORGET_AFTER
            for job_id in [j for j, job in JOBS.items() if job["job_state"] in FINAL_JOB and job["_done_at"] < cutoff]:
                del JOBS[job_id]
            data = json.dumps(JOBS)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(data)
        os.replace(tmp, path)


def _http_url(url):
    parts = urllib.parse.urlsplit(url)
    scheme = {"davs": "https", "dav": "http"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _request(method, url, data=None, length=None):
    """One HTTP request; TLS is not verified (the lake's WebDAV certificate is self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, data=data, method=method)
    if TOKEN_FILE is not None:
        with open(TOKEN_FILE) as fh:
            req.add_header("Authorization", "Bearer " + fh.read().strip())
    if length is not None:
        req.add_header("Content-Length", str(length))
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT, context=ctx)
        return resp.status, resp
    except urllib.error.HTTPError as err:
        return err.code, err


def _local_path(url):
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


def _fetch(src, out):
    """Copy the source into the open file ``out``; return (size, adler32 hex, md5 hex)."""
    adler, md5, size = 1, hashlib.md5(), 0
    scheme = urllib.parse.urlsplit(src).scheme
    if scheme == "file":
        source = open(_local_path(src), "rb")
    elif scheme in ("http", "https", "dav", "davs"):
        status, source = _request("GET", _http_url(src))
        if status != 200:
            raise RuntimeError("SOURCE [%d] GET %s failed" % (status, src))
    else:
        raise RuntimeError("SOURCE unsupported scheme %r" % scheme)
    with source:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            adler = zlib.adler32(chunk, adler)
            md5.update(chunk)
            size += len(chunk)
            out.write(chunk)
    out.flush()
    return size, "%08x" % (adler & 0xFFFFFFFF), md5.hexdigest()


def _exists(dst):
    if urllib.parse.urlsplit(dst).scheme == "file":
        return os.path.exists(_local_path(dst))
    status, _ = _request("HEAD", _http_url(dst))
    return status == 200


def _store(tmpname, dst):
    scheme = urllib.parse.urlsplit(dst).scheme
    if scheme == "file":
        path = _local_path(dst)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(tmpname, path + ".fts-part")
        os.replace(path + ".fts-part", path)
        return
    if scheme not in ("http", "https", "dav", "davs"):
        raise RuntimeError("DESTINATION unsupported scheme %r" % scheme)
    url = _http_url(dst)
    size = os.path.getsize(tmpname)
    for attempt in (1, 2):
        with open(tmpname, "rb") as fh:
            status, _ = _request("PUT", url, data=fh, length=size)
        if status in (200, 201, 204):
            return
        if attempt == 1 and status in (403, 404, 405, 409):
            parts = urllib.parse.urlsplit(url)
            segments = parts.path.split("/")[1:-1]
            for i in range(1, len(segments) + 1):
                collection = "/" + "/".join(segments[:i]) + "/"
                _request("MKCOL", urllib.parse.urlunsplit((parts.scheme, parts.netloc, collection, "", "")))
            continue
        raise RuntimeError("DESTINATION [%d] PUT %s failed" % (status, dst))


def _copy_file(job, f, knobs):
    params = job["params"]
    overwrite = bool(params.get("overwrite", True))
    verify = params.get("verify_checksum", "none")
    if isinstance(verify, bool):
        verify = "both" if verify else "none"
    want_size = f.get("filesize")
    want_checksum = f.get("checksum") or ""
    errors = []
    for src in f["sources"]:
        for dst in f["destinations"]:
            f["source_surl"], f["dest_surl"] = src, dst
            try:
                if knobs["fail"] and (re.search(knobs["fail"], src) or re.search(knobs["fail"], dst)):
                    raise RuntimeError("TRANSFER forced failure by fts-shim (fail knob %r)" % knobs["fail"])
                if not overwrite and _exists(dst):
                    raise RuntimeError("DESTINATION file exists and overwrite is not enabled")
                with tempfile.NamedTemporaryFile(prefix="fts-shim-") as tmp:
                    size, adler, md5 = _fetch(src, tmp)
                    if want_size not in (None, "") and int(want_size) != size:
                        raise RuntimeError("TRANSFER size mismatch: expected %s got %d" % (want_size, size))
                    if want_checksum and ":" in want_checksum and verify in ("both", "source", "target"):
                        algorithm, value = want_checksum.split(":", 1)
                        got = {"adler32": adler, "md5": md5}.get(algorithm.lower())
                        if got is not None and got.lstrip("0") != value.lower().lstrip("0"):
                            raise RuntimeError(
                                "TRANSFER checksum mismatch %s: expected %s got %s" % (algorithm, value, got)
                            )
                    _store(tmp.name, dst)
                return "FINISHED", ""
            except Exception as err:
                # FTS reports any failure of a file as its reason; so do we
                LOG.warning("copy %s -> %s failed: %s", src, dst, err)
                errors.append(str(err))
    return "FAILED", "; ".join(errors)[:1000]


def _run_job(job_id):
    with LOCK:
        job = JOBS[job_id]
    multihop = job["job_type"] == "H"
    failed_hop = False
    for f in job["files"]:
        with LOCK:
            if job["job_state"] == "CANCELED":
                break
            if multihop and failed_hop:
                f["file_state"] = "NOT_USED"
                continue
            f["file_state"] = "ACTIVE"
            f["start_time"] = _now()
            job["job_state"] = "ACTIVE"
        DIRTY.set()
        knobs = KNOBS.current()
        if knobs["delay"] > 0:
            time.sleep(knobs["delay"])
        state, reason = _copy_file(job, f, KNOBS.current())
        with LOCK:
            f["file_state"], f["reason"], f["finish_time"] = state, reason, _now()
        failed_hop = failed_hop or state != "FINISHED"
        LOG.info("job %s file %s -> %s %s", job_id, f["dest_surl"], state, reason)
    with LOCK:
        if job["job_state"] != "CANCELED":
            states = {f["file_state"] for f in job["files"]}
            if states <= {"FINISHED"}:
                job["job_state"] = "FINISHED"
            elif "FINISHED" in states and not multihop:
                job["job_state"] = "FINISHEDDIRTY"
            else:
                job["job_state"] = "FAILED"
        job["job_finished"] = _now()
        job["_done_at"] = time.time()
    DIRTY.set()


FILE_FIELDS = (
    "file_id",
    "file_state",
    "source_surl",
    "dest_surl",
    "start_time",
    "finish_time",
    "staging_start",
    "staging_finished",
    "reason",
    "file_metadata",
    "filesize",
    "checksum",
)


def _file_view(f):
    return {k: f.get(k) for k in FILE_FIELDS}


def _job_view(job, with_files=True):
    view = {k: v for k, v in job.items() if k not in ("params", "files") and not k.startswith("_")}
    view["http_status"] = "200 Ok"
    if with_files:
        view["files"] = [_file_view(f) for f in job["files"]]
    return view


def _new_job(job_id, params, files_in):
    return {
        "job_id": job_id,
        "job_state": "SUBMITTED",
        "job_type": "H"
        if params.get("multihop")
        else ("R" if any(len(f.get("sources", [])) > 1 for f in files_in) else "N"),
        "job_metadata": params.get("job_metadata") or {},
        "submit_time": _now(),
        "job_finished": None,
        "_done_at": 0.0,
        "priority": params.get("priority"),
        "params": params,
        "files": [
            {
                "file_id": i,
                "file_state": "SUBMITTED",
                "sources": f.get("sources", []),
                "destinations": f.get("destinations", []),
                "source_surl": (f.get("sources") or [None])[0],
                "dest_surl": (f.get("destinations") or [None])[0],
                "start_time": None,
                "finish_time": None,
                "staging_start": None,
                "staging_finished": None,
                "reason": "",
                "file_metadata": f.get("metadata") or {},
                "filesize": f.get("filesize"),
                "checksum": f.get("checksum"),
            }
            for i, f in enumerate(files_in)
        ],
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        LOG.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    def _parts(self):
        return [p for p in urllib.parse.urlsplit(self.path).path.split("/") if p]

    def do_GET(self):
        parts = self._parts()
        if not parts:
            return self._send(200, {"api": {"major": 3, "minor": 12, "patch": 0}, "shim": "datalakefs demo fts-shim"})
        if parts == ["_knobs"]:
            return self._send(200, KNOBS.current())
        if parts == ["whoami"]:
            return self._send(
                200,
                {
                    "base_id": BASE_ID,
                    "vos": ["def"],
                    "user_dn": "demo",
                    "dn": ["demo"],
                    "delegation_id": "demo",
                    "roles": [],
                    "vos_id": [BASE_ID],
                    "method": "none",
                },
            )
        if parts[:2] == ["ban", "se"]:
            return self._send(200, [])
        if parts[:2] == ["config", "se"]:
            return self._send(200, {})
        if parts == ["jobs"]:
            with LOCK:
                return self._send(200, [_job_view(j, False) for j in JOBS.values()])
        if parts[0] == "jobs" and len(parts) == 3 and parts[2] == "files":
            with LOCK:
                job = JOBS.get(parts[1])
                if not job:
                    return self._send(404, {"status": "404 Not Found", "message": "No job with the id %s" % parts[1]})
                return self._send(200, [_file_view(f) for f in job["files"]])
        if parts[0] == "jobs" and len(parts) == 2:
            ids = parts[1].split(",")
            out = []
            with LOCK:
                for job_id in ids:
                    job = JOBS.get(job_id)
                    if job:
                        out.append(_job_view(job))
                    else:
                        out.append(
                            {
                                "job_id": job_id,
                                "http_status": "404 Not Found",
                                "http_message": "No job with the id %s" % job_id,
                            }
                        )
            if len(ids) == 1:
                return self._send(200 if out[0]["http_status"] == "200 Ok" else 404, out[0])
            return self._send(207, out)
        return self._send(404, {"status": "404 Not Found", "message": self.path})

    def do_POST(self):
        parts = self._parts()
        body = self._body()
        if parts == ["jobs"]:
            params = body.get("params") or {}
            files_in = body.get("files") or []
            if not files_in:
                return self._send(400, {"status": "400 Bad Request", "message": "No transfers"})
            job_id = str(uuid.uuid4())
            if params.get("id_generator") == "deterministic" and params.get("sid"):
                job_id = str(uuid.uuid5(uuid.uuid5(uuid.UUID(BASE_ID), "def"), params["sid"]))
            with LOCK:
                if job_id in JOBS:
                    return self._send(409, {"status": "409 Conflict", "message": "job exists"})
                JOBS[job_id] = _new_job(job_id, params, files_in)
            DIRTY.set()
            threading.Thread(target=_run_job, args=(job_id,), daemon=True).start()
            LOG.info("submitted job %s with %d file(s)", job_id, len(files_in))
            return self._send(200, {"job_id": job_id})
        if len(parts) == 2 and parts[0] == "jobs":
            return self._send(200, {"job_id": parts[1]})
        if parts[:2] in (["ban", "se"], ["config", "se"]):
            return self._send(200, {})
        return self._send(404, {"status": "404 Not Found", "message": self.path})

    def do_DELETE(self):
        parts = self._parts()
        if len(parts) == 2 and parts[0] == "jobs":
            with LOCK:
                job = JOBS.get(parts[1])
                if not job:
                    return self._send(404, {"status": "404 Not Found"})
                job["job_state"] = "CANCELED"
                job["_done_at"] = time.time()
                for f in job["files"]:
                    if f["file_state"] not in FINAL_FILE:
                        f["file_state"] = "CANCELED"
                view = _job_view(job, False)
            DIRTY.set()
            return self._send(200, view)
        if parts[:2] == ["ban", "se"]:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send(404, {"status": "404 Not Found"})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--knobs", required=True, help="JSON knob file, re-read when it changes")
    parser.add_argument("--state", default=None, help="JSON file the jobs are saved to")
    parser.add_argument("--log", default=None)
    parser.add_argument("--token-file", default=None, help="bearer token sent with every storage request")
    args = parser.parse_args()
    global TOKEN_FILE
    TOKEN_FILE = args.token_file
    logging.basicConfig(level=logging.INFO, filename=args.log, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    KNOBS.path = args.knobs
    LOG.info("knobs at start: %s", KNOBS.current())
    if args.state:
        if os.path.exists(args.state):
            with open(args.state) as fh:
                JOBS.update(json.load(fh))
            for job_id, job in JOBS.items():
                if job["job_state"] in ("SUBMITTED", "ACTIVE"):
                    threading.Thread(target=_run_job, args=(job_id,), daemon=True).start()
        threading.Thread(target=_saver, args=(args.state,), daemon=True).start()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    LOG.info("fts-shim listening on http://%s:%d", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
