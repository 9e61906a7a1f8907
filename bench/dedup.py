"""What each dedup rule costs on CPU per million samples, with the all-pairs baseline for the
semantic rule measured on the same data in the same run.

    .venv/bin/python bench/dedup.py [--n-pdq 20000] [--n-sem 40000] [--dims 512,768] [--json out.json]

Single process, one thread for numpy's BLAS unless --threads says otherwise; the functions timed
are the ones the Beam workers run (pipeline.dedup), on synthetic data of realistic shape:

  exact     grouping N sha256 hex strings (the GroupByKey's work, in a dict)
  pdq       multi-index hashing (`pdq_pairs`: keys, buckets, verification) on N random 256-bit
            hashes, 10% of them with a planted near copy; at radii 7, 15 and 31
  semantic  SemDeDup-style clustering (`semantic_pairs`: k-means on 32 x k samples, 2 nearest
            clusters each, exact cosine in blocks) vs every pair in blocks (`all_pairs_cosine`,
            the baseline), unit float16 embeddings at each --dims, 10% planted near copies
            (cosine ~0.99), threshold 0.95; recall = pairs found / all pairs
  eval      one sample against a 10,000-image evaluation index (PdqIndex, radius 31)
  walk      the keep rule (`solve`) on the samples that have a duplicate: seconds and bytes each
  components  connected components (`connected_components`) of their links, in one worker

Per-million figures: exact, eval, walk and the clustered semantic rule are linear in N (a cluster's
size is fixed), so they scale by 1e6 / N; all-pairs is quadratic, so it scales by (1e6 / N)^2. PDQ
has a linear part (keys) and a part that grows with N^2 / 2^chunk_bits (candidate pairs in a
bucket); the per-million figure adds the verification cost of the candidates a million uniform
hashes would make.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-pdq", type=int, default=20000)
    ap.add_argument("--n-sem", type=int, default=60000)
    ap.add_argument("--dims", default="512,768")
    ap.add_argument("--cluster-size", type=int, default=2000,
                    help="samples per cluster in the timed run (k = n / this, so the measured ratio is a real one); "
                         "the per-million figure is also given at pipeline.dedup's default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    _threads(args.threads)
    import hashlib

    import numpy as np

    from pipeline import dedup as D

    rng = random.Random(0)
    out = {"threads": args.threads, "cpu": os.cpu_count()}
    M = 1_000_000

    # exact
    n = 1_000_000
    shas = [hashlib.sha256(str(rng.randrange(n)).encode()).hexdigest() for _ in range(n)]
    t = time.perf_counter()
    groups: dict = {}
    for i, s in enumerate(shas):
        groups.setdefault(s, []).append(i)
    dup_groups = sum(1 for g in groups.values() if len(g) > 1)
    s_exact = time.perf_counter() - t
    out["exact"] = {"n": n, "s": s_exact, "s_per_million": s_exact * M / n, "groups_with_duplicates": dup_groups}
    print(f"exact    n={n:,}: {s_exact:.2f} s -> {s_exact * M / n:.2f} s per million")

    # pdq
    out["pdq"] = {}
    for radius in (7, 15, 31):
        n = args.n_pdq
        vals = [rng.getrandbits(256) for _ in range(n)]
        for v in vals[: n // 10]:
            for p in rng.sample(range(256), rng.randint(1, radius)):
                v ^= 1 << p
            vals.append(v)
        chunks = D.pdq_chunks(radius)
        bits = 256 // chunks
        t = time.perf_counter()
        pairs = D.pdq_pairs(vals, radius)
        s = time.perf_counter() - t
        # Verification cost per candidate, and the candidates a million uniform hashes make.
        a, b = vals[0], vals[1]
        t = time.perf_counter()
        for _ in range(200_000):
            D.hamming(a, b)
        per_check = (time.perf_counter() - t) / 200_000
        keys = D.keys_per_hash(radius)
        stored = chunks
        # Pairs colliding on a stored key (chunks x N^2/2 / 2^bits) plus probes hitting another's stored key (N x probes x N / 2^bits).
        cand_million = (M ** 2) * (keys - stored / 2) / (2 ** bits)
        s_million = s * M / len(vals) + cand_million * per_check
        out["pdq"][radius] = {"n": len(vals), "s": s, "pairs": len(pairs), "keys_per_hash": keys, "chunk_bits": bits,
                              "candidates_per_million_uniform": cand_million, "s_per_million": s_million}
        print(f"pdq r={radius:<2} n={len(vals):,} ({keys} keys/hash, {bits}-bit chunks): {s:.2f} s, {len(pairs)} pairs -> "
              f"{s_million:.0f} s per million (of which {cand_million * per_check:.0f} s verifying {cand_million:.3g} candidates)")

    # semantic
    out["semantic"] = {}
    for d in (int(x) for x in args.dims.split(",")):
        n = args.n_sem
        nrng = np.random.default_rng(d)
        topics = nrng.normal(size=(200, d)).astype(np.float32)
        x = topics[nrng.integers(0, 200, n)] + 0.6 * nrng.normal(size=(n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        k = n // 10
        x[-k:] = x[:k] + 0.1 / math.sqrt(d) * 1.4 * nrng.normal(size=(k, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = x.astype("<f2").astype(np.float32)  # as stored
        ids = [f"{i:08d}" for i in range(n)]
        t = time.perf_counter()
        got = D.semantic_pairs(ids, x, 0.95, cluster_size=args.cluster_size)
        s_sem = time.perf_counter() - t
        t = time.perf_counter()
        want = D.all_pairs_cosine(ids, x, 0.95)
        s_all = time.perf_counter() - t
        recall = len(set(got) & set(want)) / max(1, len(want))
        kk = math.ceil(n / args.cluster_size)
        # k-means at a million: k = 100, 32 x k samples, 20 iterations of [32k, d] x [d, k].
        t = time.perf_counter()
        D.kmeans(x[: D.KMEANS_SAMPLE_PER_CLUSTER * kk], kk)
        s_km = time.perf_counter() - t
        # Per sample, the in-cluster work is linear in the cluster size; k-means is quadratic in k.
        per_million = {}
        for size in (args.cluster_size, D.SEMANTIC_CLUSTER_SIZE):
            k_m = math.ceil(M / size)
            per_million[size] = ((s_sem - s_km) * M / n * size / args.cluster_size, s_km * (k_m / kk) ** 2)
        s_all_million = s_all * (M / n) ** 2
        out["semantic"][d] = {"n": n, "cluster_size": args.cluster_size, "clusters": kk, "s": s_sem, "s_kmeans": s_km,
                              "s_all_pairs": s_all, "all_pairs_over_clustered": s_all / s_sem, "recall": recall,
                              "pairs": len(want), "s_all_pairs_per_million": s_all_million,
                              "per_million_by_cluster_size": {str(c): {"in_clusters_s": a, "kmeans_s": b} for c, (a, b) in per_million.items()}}
        print(f"semantic d={d} n={n:,} k={kk} ({args.cluster_size}/cluster): clustered {s_sem:.2f} s (k-means {s_km:.2f} s), "
              f"all pairs {s_all:.2f} s: all_pairs/clustered = {s_all / s_sem:.2f}x, recall {recall:.4f} of {len(want)} pairs")
        for c, (a, b) in per_million.items():
            print(f"    per million at {c}/cluster: in clusters {a:.0f} s + k-means {b:.0f} s (one worker); "
                  f"all pairs {s_all_million:.0f} s = {s_all_million / (a + b):.0f}x")

    # eval
    eval_named = [(f"e{i}", rng.getrandbits(256)) for i in range(10_000)]
    index = D.PdqIndex(eval_named, 31)
    queries = [rng.getrandbits(256) for _ in range(5_000)]
    t = time.perf_counter()
    for q in queries:
        index.query(q)
    s_eval = time.perf_counter() - t
    out["eval"] = {"queries": len(queries), "eval_images": len(eval_named), "s": s_eval, "s_per_million": s_eval * M / len(queries)}
    print(f"eval     {len(queries):,} samples vs {len(eval_named):,} eval hashes (r=31): {s_eval:.2f} s -> "
          f"{s_eval * M / len(queries):.0f} s per million")

    # walk
    n = 200_000
    nodes = []
    edges: dict = {"pdq": {}}
    for i in range(n):
        v = f"{i // 2:064x}"  # pairs of equal hashes
        nodes.append({"uid": f"{rng.getrandbits(128):032x}", "rank": (-rng.choice((65536, 40000)), 1, 0.0, f"{i:08d}"), "fixed": False,
                      "values": {"pdq": v, "exact": f"s{i}"}})
    for i in range(0, n // 2 - 1, 2):  # and a chain of edges between every other pair
        a, b = f"{i:064x}", f"{i + 1:064x}"
        edges["pdq"].setdefault(a, {})[b] = 5
        edges["pdq"].setdefault(b, {})[a] = 5
    tracemalloc.start()
    t = time.perf_counter()
    removed = D.solve(nodes, edges, ("exact", "pdq"))
    s_walk = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    import pickle

    held = len(pickle.dumps(nodes)) / n
    out["walk"] = {"n": n, "removed": len(removed), "s": s_walk, "s_per_million": s_walk * M / n, "peak_bytes_per_node": peak / n,
                   "pickled_bytes_per_node": held}
    print(f"walk     {n:,} samples with a duplicate: {s_walk:.2f} s -> {s_walk * M / n:.1f} s per million; "
          f"walk's own peak {peak / n:.0f} B/sample on top of the nodes (~{held:.0f} B pickled each)")
    # components: the links of those samples (sample - value, value - value) as int64, in one worker
    links = [(D._id64("u", nd["uid"]), D._id64(r, v)) for nd in nodes for r, v in nd["values"].items()]
    links += [(D._id64("pdq", a), D._id64("pdq", b)) for a, nb in edges["pdq"].items() for b in nb if a < b]
    arr = np.asarray(links, dtype=np.int64)
    tracemalloc.start()
    t = time.perf_counter()
    ids, label = D.connected_components(arr)
    s_cc = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["components"] = {"links": len(arr), "components": int(len(np.unique(label))), "s": s_cc,
                         "s_per_million_samples": s_cc * M / n, "peak_bytes_per_link": (peak + arr.nbytes) / len(arr)}
    print(f"components {len(arr):,} links of {n:,} samples: {s_cc:.2f} s -> {s_cc * M / n:.1f} s per million samples; "
          f"{(peak + arr.nbytes) / len(arr):.0f} B per link at the peak (links included)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
