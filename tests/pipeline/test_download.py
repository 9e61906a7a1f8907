"""pipeline/download.py: the Download stage's Beam adapter against a server on 127.0.0.1."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import DownloadConfig, InputConfig
from pipeline.download import Download

BODY = b"\xff\xd8\xff\xe0 not decoded here " * 10


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/ok/"):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", "/ok/" + self.path.rsplit("/", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_emits_every_record_once_with_body_or_reject(server):
    paths = ["ok", "missing", "moved", "ok", "missing"] * 8  # 40 records, more than the 3 in flight
    records = [{"uid": f"{i:032x}", "id": i, "link": f"http://{server}/{path}/{i}.jpg", "shard": i % 2} for i, path in enumerate(paths)]
    records.append({"uid": "f" * 32, "id": 99, "link": f"http://{server}/ok/x.jpg".replace(server, "localhost:9"), "shard": 0})
    cfg = DownloadConfig(timeout_s=5, threads=3, retries=0, allow_hosts=server)
    p = beam.Pipeline()
    out = p | beam.Create(records) | "Download" >> Download(cfg, InputConfig(url_col="link", id_col="id"), batch_size=4)
    kept_want = [(i, 200, "image/jpeg", len(BODY), f"http://{server}/ok/{i}.jpg") for i, path in enumerate(paths) if path != "missing"]
    assert_that(out["main"] | "Kept" >> beam.Map(lambda r: (r["id"], r["http_status"], r["content_type"], len(r["_body"]), r["final_url"])),
                equal_to(kept_want), label="Kept")
    rej_want = [(i, f"http://{server}/missing/{i}.jpg", "http_404", i % 2) for i, path in enumerate(paths) if path == "missing"]
    rej_want.append((99, "http://localhost:9/ok/x.jpg", "private_address", 0))  # loopback, not the allowed host:port
    assert_that(out["rejects"] | "Rej" >> beam.Map(lambda r: (r["SAMPLE_ID"], r["url"], r["reason"], r["shard"])),
                equal_to(rej_want), label="Rejects")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("kiln"))["counters"]}
    assert counters["download/in"] == 41 and counters["download/out"] == 24 and counters["download/rejected"] == 17
    assert counters["reject/download/http_404"] == 16 and counters["reject/download/private_address"] == 1
