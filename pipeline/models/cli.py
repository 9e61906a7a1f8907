"""`kiln models list | show NAME | fetch NAME... --to DIR [--mirror URL] | verify DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import RunFailed, UserError

__all__ = ["add_models_args", "main_models"]


def add_models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="DIR", default=None,
                        help="the registry folder [pipeline/models/registry, or $KILN_MODEL_REGISTRY]")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="the registry's models and sets")
    ls.add_argument("--json", action="store_true", help="print the registry as JSON")
    sh = sub.add_parser("show", help="one model's (or set's) entry, as JSON")
    sh.add_argument("name")
    fe = sub.add_parser("fetch", help="download models (or sets) into DIR/<name>/, checked, and record DIR/models.json",
                        description="Hub files come through huggingface_hub (HF_ENDPOINT is honoured); release URLs "
                        "through a resumable downloader. Pinned sha256s are checked; the others are recorded on first "
                        "fetch, for `kiln models verify`.")
    fe.add_argument("names", nargs="+", metavar="NAME")
    fe.add_argument("--to", required=True, metavar="DIR", help="the models folder")
    fe.add_argument("--mirror", metavar="URL", default=None,
                    help="fetch release URLs from this host instead (its URL replaces scheme://host of each)")
    ve = sub.add_parser("verify", help="re-hash every file of DIR against DIR/models.json")
    ve.add_argument("dir", metavar="DIR")


def _size(entry: dict) -> str:
    sizes = [f.get("size") for f in entry["files"]]
    if all(s is not None for s in sizes):
        from pipeline.models.fetch import _human

        return _human(sum(sizes))
    return "?"


def _list(reg, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"models": reg.models, "sets": reg.sets}, indent=2, sort_keys=True))
        return 0
    rows = [(e["name"], e["role"], str(e.get("embed_dim") or "-"), _pins(e), e["description"])
            for e in sorted(reg.models.values(), key=lambda e: (e["role"], e["name"]))]
    head = ("NAME", "ROLE", "DIM", "PINNED", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if reg.sets:
        print("\nSETS")
        for s in sorted(reg.sets.values(), key=lambda s: s["name"]):
            print(f"{s['name']}: {', '.join(s['members'])}" + (f" -- {s['description']}" if s["description"] else ""))
    return 0


def _pins(entry: dict) -> str:
    n = sum(1 for f in entry["files"] if f.get("sha256"))
    return f"{n}/{len(entry['files'])}"


def main_models(args) -> int:
    from pipeline.models.registry import get, load_registry, resolve_names

    reg = load_registry(args.registry)
    cmd = args.models_command
    if cmd == "list":
        return _list(reg, args.json)
    if cmd == "show":
        print(json.dumps(get(args.name, reg), indent=2))
        return 0
    if cmd == "fetch":
        from pipeline.models.fetch import fetch_models

        entries = resolve_names(args.names, reg)  # UnknownModel before any download
        if args.mirror and not args.mirror.startswith(("http://", "https://")):
            raise UserError(f"--mirror {args.mirror}: must be an http(s) URL")
        root = Path(args.to).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise UserError(f"--to {args.to}: is a file, not a folder")
        manifest = fetch_models(entries, root, mirror=args.mirror)
        for e in entries:
            rec = manifest["models"][e["name"]]
            spec = rec["spec"]
            absolute = (spec.split(":", 1)[0] + ":" + str(root / spec.split(":", 1)[1])) if ":" in spec else str(root / spec)
            if rec.get("convert") and not rec.get("converted"):
                print(f"# {e['name']} needs converting before {rec['flag']} can take it: python -m filters.{rec['convert']} "
                      f"{root / e['name'] / e['files'][0]['path']} {root / e['name'] / e['head']}")
            print(f"{rec['flag']} {absolute}")
        return 0
    if cmd == "verify":
        from pipeline.models.fetch import MANIFEST, verify_dir

        problems = verify_dir(args.dir)
        for p in problems:
            print(f"kiln models verify: {p}", file=sys.stderr)
        if problems:
            raise RunFailed(f"{len(problems)} file(s) in {args.dir} do not match {MANIFEST}; fetch them again "
                            f"(`kiln models fetch NAME --to {args.dir}`)")
        print(f"{args.dir}: every file matches {MANIFEST}")
        return 0
    raise AssertionError(cmd)
