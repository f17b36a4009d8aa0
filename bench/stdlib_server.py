"""Baseline for the server comparison: the standard library's ThreadingHTTPServer serving the same bytes.

Not part of the product. ``python bench/stdlib_server.py PORT SUMMARY_FILE USERS_FILE`` answers
``/api/m365/summary`` and ``/api/m365/users`` (any query) from memory with HTTP/1.1 keep-alive and the
same kind of headers m365-serve sends, so wrk measures only the server library.
"""

from __future__ import annotations

import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    port, summary, users = int(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()
    bodies = {"/api/m365/summary": summary, "/api/m365/users": users}
    etags = {path: '"' + hashlib.sha256(body).hexdigest()[:32] + '"' for path, body in bodies.items()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            body = bodies.get(path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etags[path])
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
