"""A local OpenAI-compatible ``/chat/completions`` server for tests: it answers from a script
("ok", "garbage", "sleep", or an HTTP status) and records what it was sent."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "sk-test-abcdef0123456789"
ANSWER = "<think>4</think><answer>4</answer>"


class Stub:
    def __init__(self):
        self.script: list[str] = []  # what to answer, one entry per request; then "ok"
        self.seen: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.seen.append({"auth": self.headers.get("Authorization"), "body": body})
                action = stub.script.pop(0) if stub.script else "ok"
                if action == "sleep":
                    time.sleep(1.0)
                    action = "ok"
                if action == "ok":
                    payload = json.dumps({"choices": [{"message": {"content": ANSWER}}]})
                    self.send_response(200)
                elif action == "garbage":
                    payload = "{not json"
                    self.send_response(200)
                else:
                    payload = "{}"
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
