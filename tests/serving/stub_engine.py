"""A stand-in for vLLM in the pool agent's tests (run as the engine's Python, with vLLM's
arguments): it records the environment it was given beside itself, serves canned vLLM metrics
that name a tenant's adapters (over TLS when given vLLM's --ssl-* flags), and never answers
/v1/models, so it never becomes ready."""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

Path(f"{sys.argv[0]}.env.json").write_text(json.dumps(dict(os.environ)))


def argument(name: str) -> str:
    return sys.argv[sys.argv.index(name) + 1]


MODEL = argument("--served-model-name")
METRICS = f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{{max_lora="2",running_lora_adapters="ft:acme-corp:support-bot",waiting_lora_adapters=""}} 1.7e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="{MODEL}"}} 42.0
""".encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        status, body = (200, METRICS) if self.path == "/metrics" else (404, b"")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


server = HTTPServer((argument("--host"), int(argument("--port"))), Handler)
if "--ssl-certfile" in sys.argv:  # as vLLM does with these flags
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(argument("--ssl-certfile"), argument("--ssl-keyfile"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
