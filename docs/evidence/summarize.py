"""Tables of the evidence runs (docs/evidence/*.sh): kNN top-1 at k = 20 per seed, mean +- std (sample std, n - 1).

    python docs/evidence/summarize.py EVIDENCE_DIR {adapt,distill,curation}
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def top1(path: Path) -> float | None:
    return json.loads(path.read_text())["k"]["20"]["top1"] if path.is_file() else None


def row(name: str, values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    cells = " / ".join("-" if v is None else f"{v:.4f}" for v in values)
    if len(got) >= 2:
        summary = f"{statistics.mean(got):.4f} ± {statistics.stdev(got):.4f}"
    elif got:
        summary = f"{got[0]:.4f} (one seed)"
    else:
        summary = "not run"
    return f"| {name} | {summary} | {cells} |"


def table(root: Path, arms: list[tuple[str, str]]) -> str:
    lines = ["| arm | kNN top-1, mean ± std | seeds 0 / 1 / 2 |", "|---|---|---|"]
    for name, pattern in arms:
        if "{s}" in pattern:
            lines.append(row(name, [top1(root / pattern.format(s=s)) for s in range(3)]))
        else:  # one run that does not depend on the seed (a teacher, a random init)
            value = top1(root / pattern)
            lines.append(f"| {name} | {'not run' if value is None else f'{value:.4f}'} (one network) | |")
    return "\n".join(lines)


def main() -> None:
    evidence, which = Path(sys.argv[1]), sys.argv[2]
    if which == "adapt":
        print(table(evidence / "adapt", [("not adapted (the Fashion-MNIST export)", "knn_notadapted_s{s}.json"),
                                         ("adapted (continued on digits, 500 steps)", "knn_adapted_s{s}.json"),
                                         ("from scratch on digits (500 steps)", "knn_scratch_s{s}.json")]))
    elif which == "distill":
        d = evidence / "distill"
        for data in ("fm", "digits"):
            print(f"\n{data}:")
            print(table(d, [("teacher (SimCLR ResNet-18)", f"knn_{data}_teacher.json"),
                            ("random init (demo ViT)", f"knn_{data}_random_vit.json"),
                            ("demo ViT distilled (500 steps)", f"knn_{data}_vit_distilled_s{{s}}.json"),
                            ("demo ViT, DINOv2 from scratch (500 steps)", f"knn_{data}_vit_scratch_s{{s}}.json"),
                            ("random init (ResNet-10t)", f"knn_{data}_random_resnet.json"),
                            ("ResNet-10t distilled (500 steps)", f"knn_{data}_resnet_distilled_s{{s}}.json"),
                            ("ResNet-10t, SimCLR from scratch (500 steps)",
                             f"knn_{data}_resnet_scratch_s{{s}}.json")]))
    elif which == "curation":
        print(table(evidence / "curate", [("curated N (demo ViT embeddings)", "knn_curated_s{s}.json"),
                                          ("curated N (SimCLR ResNet-18 embeddings)", "knn_curated_t_s{s}.json"),
                                          ("random N", "knn_random_s{s}.json"), ("whole pool", "knn_whole_s{s}.json")]))
        for s, tag in [(s, tag) for tag in ("", "t_") for s in range(3)]:
            stats = evidence / "curate" / f"stats_{tag}s{s}.json"
            if stats.is_file() and stats.stat().st_size:
                st = json.loads(stats.read_text())
                print(f"{'teacher' if tag else 'demo ViT'} seed {s}: entropy pool {st['pool']['entropy_bits']} curated {st['curated']['entropy_bits']} "
                      f"random {st['random']['entropy_bits']} bits; junk pool {st['pool']['junk_share']} curated "
                      f"{st['curated']['junk_share']} random {st['random']['junk_share']}; two heavy classes pool "
                      f"{st['pool']['heavy_share']} curated {st['curated']['heavy_share']} random "
                      f"{st['random']['heavy_share']}; planted duplicates found {st['planted_found']}/"
                      f"{st['planted_duplicates']} ({st['planted_found_share']}), removed {st['removed']} of which "
                      f"{st['removed_outside_planted_pairs']} outside planted pairs; curated kinds {st['curated_kinds']}")
    else:
        raise SystemExit(f"unknown evidence {which!r}: adapt, distill or curation (Gram anchoring: gram_report.py)")


if __name__ == "__main__":
    main()
