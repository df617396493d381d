"""How far our model is from open_clip on a directory of golden files: the committed fixtures
(default) or the released architectures that ``make_fixtures.py --full-size DIR`` writes.

  python -m tests.interop.measure_parity [DIR] [--scan]

Prints, per model and CLS mask, the max abs difference of each output (fp32, CPU) and whether
the greedy captions equal open_clip's ``generate``; the numbers docs/open_clip.md reports.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from tests.interop import golden


def measure(directory: pathlib.Path, scan: bool) -> list[dict]:
    manifest = golden.load_manifest(directory)
    rows = []
    for name, spec in manifest.items():
        if not isinstance(spec, dict) or "config" not in spec:
            continue  # greedy settings, versions
        for cls_mask in spec["cls_masks"]:
            start = time.perf_counter()
            net, params = golden.imported(name, cls_mask, scan, directory)
            out = golden.outputs(name, cls_mask, directory)
            got = golden.ours(net, params, out)
            row = dict(model=name, cls_mask=cls_mask)
            row.update({key: golden.max_diff(value, out[key]) for key, value in got.items()})
            captions = golden.greedy(net, params, out, manifest["greedy"])
            row["greedy_equal"] = bool(np.array_equal(captions, out["greedy"]))
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(
                f"{name:14s} {cls_mask:9s} "
                + " ".join(f"{k}={row[k]:.2e}" for k in got)
                + f" greedy_equal={row['greedy_equal']} ({row['seconds']:.0f}s)",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", default=str(golden.DIRECTORY))
    parser.add_argument("--scan", action="store_true", help="scanned (stacked) layers")
    args = parser.parse_args()
    measure(pathlib.Path(args.directory), args.scan)


if __name__ == "__main__":
    main()
