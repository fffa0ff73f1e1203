"""Merge tuned launch configs into a shipped table: ``python bench/merge_table.py TUNED.json [--bucket N1]
[--into kernels/tables/sm_90.json]``. Entries of the tuned table (only those of one token bucket with ``--bucket``)
replace the shipped ones of the same key; the result is written atomically, keys sorted."""

from __future__ import annotations

import argparse
import sys

from blrdeploy.kernels.configs import ConfigTable


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tuned")
    ap.add_argument("--bucket", help="only keys of this token bucket, e.g. N1")
    ap.add_argument("--into", default="kernels/tables/sm_90.json")
    args = ap.parse_args(argv)
    shipped, tuned = ConfigTable.load(args.into), ConfigTable.load(args.tuned)
    chosen = {k: c for k, c in tuned.entries.items() if args.bucket is None or k.endswith(f"|{args.bucket}")}
    for key, config in chosen.items():
        shipped.put(key, config)
    shipped.save(args.into)
    print(f"merged {len(chosen)} entries into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
