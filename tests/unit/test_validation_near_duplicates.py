"""Units: phash pair search, clustering, and the derived dq_* columns (no GX run)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _validation_helpers import flip_bits, make_manifest

from bonefrac.config import ValidationParams
from bonefrac.validation.checks import prepare_table
from bonefrac.validation.near_duplicates import clusters, near_duplicate_pairs, parse_phash


def _brute(hashes: list[int], t: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= t
    }


def test_pairs_match_brute_force_and_skip_invalid() -> None:
    rng = np.random.default_rng(1)
    base = [int(x) for x in rng.integers(0, 2**62, size=30)]
    hashes = [*base, base[0] ^ 0b101, base[3] ^ 1, base[3]]  # planted near copies
    hexes: list[object] = [f"{h:016x}" for h in hashes] + ["", "nothex", None]
    i, j, d = near_duplicate_pairs(hexes, 3)
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert got == _brute(hashes, 3)
    assert {(0, 30), (3, 31), (3, 32), (31, 32)} <= got
    assert all(bin(hashes[a] ^ hashes[b]).count("1") == dist for a, b, dist in zip(i, j, d, strict=True))
    _, valid = parse_phash(hexes)
    assert valid.sum() == len(hashes)


def test_pairs_across_blocks(monkeypatch) -> None:
    import bonefrac.validation.near_duplicates as nd

    monkeypatch.setattr(nd, "_BLOCK", 7)  # force several blocks
    rng = np.random.default_rng(2)
    hashes = [int(x) for x in rng.integers(0, 2**62, size=25)]
    hashes[20] = hashes[2] ^ 0b11
    i, j, _ = nd.near_duplicate_pairs([f"{h:016x}" for h in hashes], 4)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute(hashes, 4)


def test_3000_hashes_in_seconds() -> None:
    rng = np.random.default_rng(3)
    hexes = [f"{int(h):016x}" for h in rng.integers(0, 2**63, size=3000, dtype=np.int64)]
    t0 = time.perf_counter()
    near_duplicate_pairs(hexes, 4)
    assert time.perf_counter() - t0 < 5.0


def test_clusters_are_connected_components() -> None:
    labels = clusters(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2]
    assert labels[4] == labels[5]
    assert len({labels[0], labels[3], labels[4]}) == 3


def test_exact_duplicates_keep_first_unless_labels_differ() -> None:
    df = make_manifest(12)
    df.loc[5, "sha256"] = df.loc[4, "sha256"]  # same label (4 and 5 are both negatives)
    df.loc[7, "sha256"] = df.loc[4, "sha256"]
    df.loc[9, "sha256"] = df.loc[3, "sha256"]  # 3 is positive, 9 positive too
    df.loc[10, "sha256"] = df.loc[6, "sha256"]  # 6 positive, 10 negative: conflict
    prep = prepare_table(df, ValidationParams())
    flag = prep.table["dq_exact_duplicate"].tolist()
    assert [k for k, f in enumerate(flag) if f] == [5, 6, 7, 9, 10]
    assert prep.duplicate_of[5] == "img0004.png"
    assert 6 not in prep.duplicate_of
    assert prep.facts["exact_duplicate_groups"] == 3


def test_near_duplicate_conflict_needs_close_hash_and_equal_intensity() -> None:
    df = make_manifest(12)
    df.loc[1, "phash"] = flip_bits(df.loc[0, "phash"], 2)  # 0 positive, 1 negative: a copy with another label
    df.loc[1, "intensity_mean"] = df.loc[0, "intensity_mean"] + 0.001
    df.loc[2, "phash"] = flip_bits(df.loc[6, "phash"], 3)  # looks alike but different exposure
    df.loc[2, "intensity_mean"] = df.loc[6, "intensity_mean"] + 0.08
    df.loc[5, "phash"] = flip_bits(df.loc[4, "phash"], 2)  # same-label copy: not a conflict
    df.loc[5, "intensity_mean"] = df.loc[4, "intensity_mean"]
    df.loc[8, "phash"] = flip_bits(df.loc[7, "phash"], 9)  # too far apart
    df.loc[8, "intensity_mean"] = df.loc[7, "intensity_mean"]
    prep = prepare_table(df, ValidationParams(near_duplicate_max_distance=4))
    t = prep.table
    assert [k for k, f in enumerate(t["dq_near_duplicate_label_conflict"]) if f] == [0, 1]
    assert t.loc[4, "dq_near_duplicate_group"] == t.loc[5, "dq_near_duplicate_group"] >= 0
    assert t.loc[7, "dq_near_duplicate_group"] == -1
    assert prep.facts["near_duplicate_groups"] == 2
    assert prep.conflict_members[0] == ["img0001.png"]


def test_prepare_normalises_csv_round_trip_types() -> None:
    df = make_manifest(6).astype(str)
    df.loc[2, "decodes_ok"] = "False"
    df.loc[3, "fracture_type"] = float("nan")
    t = prepare_table(df, ValidationParams()).table
    assert t["decodes_ok"].tolist() == [True, True, False, True, True, True]
    assert t.loc[3, "fracture_type"] == ""
    assert t["width"].dtype.kind in "if"
