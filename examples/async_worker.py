#!/usr/bin/env python3
"""An asynchronous bgjobs worker: accept a job with 202, do the work in the background, report back.

    python3 async_worker.py --port 8000 --seconds 30

A BackgroundJob with `spec.http.url: http://<this host>:8000/` is POSTed here; the answer 202 keeps it Running until
this worker reports (an operator on this very host calls it only with `--egress-allow-loopback true`). Only the
standard library is used.
"""
import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Unreachable(Exception):
    """The report endpoint could not be reached for about 30 s."""


def report(url, token, kind, body):
    """POST one report (complete, fail or heartbeat); returns the endpoint's JSON answer. A 503 (the apiserver could
    not be reached, the replica is busy), a refused connection or no answer (a replica that died behind the reports
    Service) is sent again for about 30 s: a complete or fail sent twice is recorded once."""
    request = urllib.request.Request(
        f"{url}/v1/{kind}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    deadline, pause = time.monotonic() + 30, 0.25
    while True:
        try:
            with urllib.request.urlopen(request, timeout=8) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as refused:
            if refused.code != 503 or time.monotonic() + pause > deadline:
                raise
        except OSError as error:  # refused, reset, timed out (urllib's URLError is one too)
            if time.monotonic() + pause > deadline:
                raise Unreachable(error) from error
        time.sleep(pause)
        pause = min(pause * 2, 4)


def work(url, token, args, seconds, every):
    try:
        for done in range(0, seconds, every):
            report(url, token, "heartbeat", {"percent": 100 * done // seconds, "message": f"{done}s of {seconds}s"})
            time.sleep(min(every, seconds - done))
        report(url, token, "complete", {"result": {"echo": args, "seconds": seconds}})
    except urllib.error.HTTPError as refused:
        # 409: this attempt is no longer current (timed out, cancelled, or retried elsewhere): stop working on it.
        print("report refused:", refused.code, refused.read().decode(), flush=True)
    except Unreachable as unreachable:
        # The operator cannot be reached: a failure report would not reach it either. The attempt ends at its
        # heartbeat timeout (or its attempt timeout), and is retried.
        print("report endpoint unreachable:", unreachable, flush=True)
    except Exception as error:
        report(url, token, "fail", {"message": f"worker error: {error}", "retryable": True})


class Accept(BaseHTTPRequestHandler):
    def do_POST(self):
        args = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        url, token = self.headers["X-BGJobs-Report-Url"], self.headers["X-BGJobs-Report-Token"]
        job = threading.Thread(target=work, args=(url, token, args, self.server.seconds, self.server.every))
        job.start()
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()


if __name__ == "__main__":
    flags = argparse.ArgumentParser()
    flags.add_argument("--host", default="127.0.0.1")
    flags.add_argument("--port", type=int, default=8000)
    flags.add_argument("--seconds", type=int, default=30)
    flags.add_argument("--every", type=int, default=5, help="heartbeat interval, seconds")
    options = flags.parse_args()
    server = ThreadingHTTPServer((options.host, options.port), Accept)
    server.seconds, server.every = options.seconds, options.every
    print(f"listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()
