"""pipeline/download.py: the Download stage's Beam adapter against a server on 127.0.0.1."""

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import DownloadConfig, InputConfig
from pipeline.fetch import Fetcher
from pipeline.download import NO_HOST, Download, HostBudget, bucket_shares, download_key, top_hosts

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
    out = p | beam.Create(records) | "Download" >> Download(cfg, InputConfig(url_col="link", id_col="id"))
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


# ---------------------------------------------------------------------------------------------
# Politeness across workers: the pure parts


def test_bucket_shares_split_k_exactly():
    assert bucket_shares(16, 4) == [4, 4, 4, 4]
    assert bucket_shares(10, 4) == [3, 3, 2, 2]
    assert bucket_shares(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError):
        bucket_shares(2, 3)  # a bucket with no slot could never download


def test_download_key_is_host_port_and_a_uid_bucket():
    uid = "0123456789abcdef" * 2
    key = download_key(" http://Example.COM/a.jpg ", uid, 4)
    assert key == ("example.com:80", zlib.crc32(uid.encode()) % 4)
    assert download_key("https://example.com/other.jpg", uid, 4) == ("example.com:443", key[1])  # bucket: uid only
    assert download_key("http://[::1]:8080/x", uid, 4)[0] == "[::1]:8080"
    assert download_key("ftp://example.com/x", uid, 4)[0] == NO_HOST  # refused before connecting
    assert {download_key("http://h.test/x", f"{i:032x}", 4)[1] for i in range(64)} == {0, 1, 2, 3}


def test_budget_caps_requests_in_flight():
    b = HostBudget(limit=2)
    assert b.ready_at(0.0) == 0.0
    b.start(0.0)
    b.start(0.0)
    assert b.ready_at(0.0) is None  # both slots taken
    b.done(throttled=False)
    assert b.ready_at(0.1) == 0.1


def test_budget_paces_starts_at_its_rate():
    b = HostBudget(limit=4, rate=2.0)  # 2 URLs/s
    b.start(0.0)
    assert b.ready_at(0.0) == 0.5
    b.start(0.5)
    assert b.ready_at(0.6) == 1.0


def test_throttle_pauses_every_bucket_of_the_host_in_this_worker_and_halves_the_window():
    pause = [float("-inf")]
    a, b = HostBudget(4, pause=pause), HostBudget(4, pause=pause)
    a.start(0.0)
    a.start(0.0)
    a.throttle(1.0, wait_s=3.0)  # a 429 with Retry-After: 3
    a.throttle(1.1, wait_s=3.0)  # the second answer of the same burst: no second cut
    assert a.cap() == 2 and b.cap() == 4
    assert a.ready_at(1.2) is None  # 2 in flight = the halved window
    assert b.ready_at(1.2) == 4.1  # the other bucket waits out the pause too (the later answer's)
    a.done(throttled=True)
    assert a.ready_at(2.0) == 4.1
    a.throttle(5.0, wait_s=1.0)  # a new pause: a new cut, never below one request
    a.throttle(7.0, wait_s=1.0)
    assert a.cap() == 1


def test_window_grows_back_one_slot_per_window_of_successes():
    b = HostBudget(4)
    b.throttle(0.0, 1.0)
    b.throttle(2.0, 1.0)
    assert b.window == 1.0
    caps = []
    for _ in range(8):
        b.start(10.0)
        b.done(throttled=False)
        caps.append(b.cap())
    assert caps == [2, 2, 2, 3, 3, 3, 4, 4]  # window 1, 2, 2.5, 2.9, 3.2, 3.6, 3.8, 4


def test_with_a_rate_the_window_slows_starts_below_one_request():
    b = HostBudget(limit=1, rate=4.0)  # one in flight, 4 URLs/s
    for t in range(4):
        b.throttle(float(10 * t), 0.0)
    assert b.window == 1 / 16 and b.cap() == 1
    b.start(100.0)
    b.done(throttled=False)
    assert b.window == 1 / 8  # doubling back towards one request
    assert b.ready_at(100.0) == 104.0  # that start was paced at 4/s * 1/16: the next one 4 s later
    b.start(104.0)
    b.done(throttled=False)
    assert b.ready_at(104.0) == 106.0  # at 1/8: 2 s


def test_top_hosts_table_from_counters():
    counters = {"download/in": 9, "host/a.test:80/urls": 2, "host/a.test:80/ok": 1, "host/a.test:80/throttled": 0,
                "host/[::1]:8080/urls": 7, "host/[::1]:8080/ok": 7, "host/[::1]:8080/throttled": 3}
    assert top_hosts(counters) == [{"host": "[::1]:8080", "urls": 7, "ok": 7, "throttled": 3},
                                   {"host": "a.test:80", "urls": 2, "ok": 1, "throttled": 0}]


# ---------------------------------------------------------------------------------------------
# Politeness across workers: against hosts on 127.0.0.1-4 that count requests in flight


def _client_pid(ip: str, port: int) -> int | None:
    """The process holding the client end of a loopback TCP connection, from /proc (Linux)."""
    local = "".join(f"{int(x):02X}" for x in reversed(ip.split("."))) + f":{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            inodes = [line.split()[9] for line in f.readlines()[1:] if line.split()[1] == local]
    except OSError:
        return None
    if not inodes:
        return None
    target = f"socket:[{inodes[0]}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:  # gone, or another user's
            continue
    return None


class _CountingHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        web, host = self.server.web, self.server.host
        pid = _client_pid(*self.client_address[:2])
        with web.cond:
            if web.throttle_first and not web.throttled_one:
                # Answered once the other request started with it has arrived, so every later arrival
                # is a request the client started after this 429 or after a slot freed.
                web.throttled_one = True
                web.cond.wait_for(lambda: any(e[0] == "arrive" for e in web.log), timeout=5)
                web.log.append(("429", host, self.path, pid))  # logged before the client can read it
                throttled = True
            else:
                web.active[host] = web.active.get(host, 0) + 1
                web.max_active[host] = max(web.max_active.get(host, 0), web.active[host])
                web.log.append(("arrive", host, self.path, pid))
                web.cond.notify_all()
                throttled = False
                # Hold the request: hold_s, or until more than release_above are in flight to this host.
                web.cond.wait_for(lambda: web.release_above is not None and web.active[host] > web.release_above,
                                  timeout=web.hold_s)
                web.active[host] -= 1
        if throttled:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class _CountingWeb:
    """One listener per loopback address, each a distinct host; the log holds (event, host, path,
    sender pid) in the order the server saw them."""

    def __init__(self, addresses, hold_s=0.2):
        self.cond = threading.Condition()
        self.hold_s, self.release_above, self.throttle_first = hold_s, None, False
        self.active, self.max_active, self.log = {}, {}, []
        self.throttled_one = False
        self.servers = []
        for address in addresses:
            srv = ThreadingHTTPServer((address, 0), _CountingHandler)
            srv.daemon_threads, srv.web = True, self
            srv.host = f"{address}:{srv.server_address[1]}"
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self.servers.append(srv)
        self.hosts = [srv.host for srv in self.servers]
        self.allow = ",".join(self.hosts)

    def reset(self):
        with self.cond:
            self.active.clear()
            self.max_active.clear()
            self.log.clear()
            self.throttled_one = False

    def close(self):
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def web():
    w = _CountingWeb(["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
    yield w
    w.close()


def _rows(web, per_host):
    rows = []
    for host, n in zip(web.hosts, per_host):
        for i in range(n):
            uid = f"{len(rows):032x}"
            rows.append({"uid": uid, "SAMPLE_ID": len(rows), "URL": f"http://{host}/{uid}.jpg", "shard": 0})
    return rows


class _PerWorkerLimitFn(beam.DoFn):
    """The Download stage before issue 14 (3): rows spread over workers, each worker's Fetcher holding
    a host to `per_host_concurrency` -- per worker, nothing for the job."""

    def __init__(self, fetch_config, threads):
        self.fetch_config, self.threads = fetch_config, threads

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.fetch import Fetcher

        self.fetcher, self.pool = Fetcher(self.fetch_config), ThreadPoolExecutor(self.threads)

    def process(self, batch):
        for result in self.pool.map(lambda r: self.fetcher.fetch(r["URL"]), batch):
            yield result.ok

    def teardown(self):
        self.pool.shutdown()
        self.fetcher.close()


TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
K = 4


@pytest.mark.slow
def test_two_worker_processes_hold_a_host_to_k_for_the_whole_job(web):
    rows = _rows(web, [24, 4, 4, 4])
    big = web.hosts[0]

    # Before: each of the 2 workers holds 127.0.0.1 to K; the server keeps every request until more
    # than K are in flight to its host (or hold_s): together the workers pass K. hold_s is long so
    # that a worker process that starts late on a loaded machine still overlaps the other one.
    web.hold_s, web.release_above = 20.0, K
    cfg = DownloadConfig(per_host_concurrency=K, per_host_buckets=2, threads=16, timeout_s=30, retries=0, allow_hosts=web.allow)
    p = beam.Pipeline(options=PipelineOptions(TWO_WORKERS))
    _ = (p | beam.Create(rows) | beam.Reshuffle() | beam.BatchElements(min_batch_size=8, max_batch_size=8)
         | beam.ParDo(_PerWorkerLimitFn(cfg.fetch_config(), 16)))
    p.run().wait_until_finish()
    # A sender's pid is looked up in /proc while the request is served; on a loaded machine a lookup can
    # miss (None): the known pids are what the checks use.
    old_max, old_pids = web.max_active[big], {pid for _, _, _, pid in web.log} - {None}
    print(f"per-worker limit: max in flight to {big} = {old_max} (K = {K}), sender pids {sorted(old_pids)}")
    assert old_max > K, web.max_active
    assert len(old_pids) == 2 and os.getpid() not in old_pids  # two worker processes, not this one

    # Now: the Download stage, same workers, same rows, requests held 0.2 s each.
    web.reset()
    web.hold_s, web.release_above = 0.2, K
    p = beam.Pipeline(options=PipelineOptions(TWO_WORKERS))
    _ = p | beam.Create(rows) | Download(cfg, InputConfig())
    result = p.run()
    result.wait_until_finish()
    arrivals = [(host, path, pid) for event, host, path, pid in web.log if event == "arrive"]
    pids = {pid for _, _, pid in arrivals} - {None}
    assert len(pids) == 2 and os.getpid() not in pids, pids  # both worker processes downloaded
    assert len({pid for host, _, pid in arrivals if host == big} - {None}) == 2  # ... and both fetched the big host
    print(f"Download stage: max in flight to {big} = {web.max_active[big]} (K = {K}), sender pids {sorted(pids)}")
    assert web.max_active[big] <= K, web.max_active  # never more than K in flight to it, job-wide
    assert web.max_active[big] >= 2  # its buckets did run requests side by side
    assert sorted(path for _, path, _ in arrivals) == sorted(f"/{r['uid']}.jpg" for r in rows)  # each URL once
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("kiln"))["counters"]}
    assert counters["download/in"] == counters["download/out"] == len(rows)
    assert counters["download/hosts"] == 4 and counters[f"host/{big}/urls"] == 24 and counters[f"host/{big}/throttled"] == 0


def _between_throttle_and_retry(log):
    """Requests for other URLs that arrived after the 429 and before the throttled URL came back."""
    (i, (_, _, throttled_path, _)), = [(i, e) for i, e in enumerate(log) if e[0] == "429"]
    retry = next(j for j in range(i + 1, len(log)) if log[j][2] == throttled_path)
    return [path for _, _, path, _ in log[i + 1:retry]]


def test_a_429_with_retry_after_holds_the_host_until_the_retry_is_back(web):
    # One host, K = 2 in one bucket; its first request gets 429 + Retry-After: 1, the others are held
    # 0.5 s. The bucket's window halves to 1 and the host pauses for 1 s: the request still in flight
    # finishes, but no other URL starts until the throttled one has been retried.
    web.throttle_first, web.hold_s = True, 0.5
    host = web.hosts[0]
    rows = _rows(web, [6])
    cfg = DownloadConfig(per_host_concurrency=2, per_host_buckets=1, threads=8, timeout_s=20, retries=2, allow_hosts=web.allow)
    p = beam.Pipeline()
    out = p | beam.Create(rows) | Download(cfg, InputConfig())
    assert_that(out["main"] | beam.Map(lambda r: r["http_status"]), equal_to([200] * 6))
    result = p.run()
    result.wait_until_finish()
    assert _between_throttle_and_retry(web.log) == []
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("kiln"))["counters"]}
    assert counters["download/throttled"] == 1 and counters[f"host/{host}/throttled"] == 1

    # The same server and URLs with only a per-worker limit of 2 (the stage before): the thread whose
    # request finished starts the next URL while the throttled one waits for its retry.
    web.reset()
    with Fetcher(cfg.fetch_config()) as fetcher, ThreadPoolExecutor(8) as pool:
        assert all(r.ok for r in pool.map(lambda r: fetcher.fetch(r["URL"]), rows))
    assert len(_between_throttle_and_retry(web.log)) >= 1
