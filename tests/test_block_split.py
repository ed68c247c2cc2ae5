"""The temporal-block validation split and the threshold rule over its views."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_edge.metrics import choose_threshold_robust
from training.data import DataError, Sample, block_split, part_masks, read_split, write_split


def _samples() -> list[Sample]:
    out = []
    for fam, first, n in (("IM", 115, 60), ("NORMAL2-IM", 383, 80)):
        for k in range(n):  # two images for every third patient
            pid = f"{fam}-{first + 3 * k:04d}"
            for j in range(1 + (k % 3 == 0)):
                out.append(Sample(f"NORMAL/{pid}-000{j}.jpeg", 0, pid))
    for k in range(300):
        out.append(Sample(f"PNEUMONIA/person{k}_bacteria_{k}.jpeg", 1, f"person{k}"))
    return out


def test_block_holds_out_the_earliest_normals_of_each_family():
    samples = _samples()
    train, val = block_split(samples, 0.15, seed=1)
    assert not {s.patient for s in train} & {s.patient for s in val}
    block = [s for s in val if s.part == "block"]
    assert {s.label for s in block} == {0}
    for fam in ("IM", "NORMAL2-IM"):
        held = sorted(int(s.patient.rsplit("-", 1)[1]) for s in block
                      if s.patient.rsplit("-", 1)[0] == fam)
        kept = [int(s.patient.rsplit("-", 1)[1]) for s in train
                if s.label == 0 and s.patient.rsplit("-", 1)[0] == fam]
        assert held, fam  # both families are represented
        assert max(held) < min(kept), fam  # the earliest patients, a block
        n_fam = sum(1 for s in samples if s.patient.rsplit("-", 1)[0] == fam)
        assert 0.15 * n_fam <= len(held) <= 0.15 * n_fam + 2, fam
    views = part_masks(val)
    y = np.array([s.label for s in val])
    for name in ("block", "patient"):
        assert set(y[views[name]]) == {0, 1}, name
    # the PNEUMONIA images are shared by both views; the normals are disjoint
    assert np.array_equal(views["block"] & views["patient"], y == 1)
    n_pneu = sum(s.label for s in samples)
    assert abs(int(y.sum()) - 0.15 * n_pneu) <= 2
    # same seed, same split
    assert block_split(samples, 0.15, seed=1)[1] == val


def test_split_file_keeps_the_views(tmp_path):
    train, val = block_split(_samples(), 0.15, seed=0)
    write_split(tmp_path / "split.csv", train, val)
    train2, val2 = read_split(tmp_path / "split.csv")
    assert train2 == train and val2 == val
    assert part_masks(train2) == {}


def test_block_split_refusals():
    normals_one_family = [Sample(f"NORMAL/IM-{k:04d}-0001.jpeg", 0, f"IM-{k:04d}")
                          for k in range(2)]
    with pytest.raises(DataError, match="val-fraction"):
        block_split(_samples(), 0.6, seed=0)
    with pytest.raises(DataError):
        block_split(normals_one_family + [Sample("PNEUMONIA/person1_virus_1.jpeg", 1,
                                                 "person1")], 0.15, seed=0)


def test_threshold_rule_holds_on_the_worst_view():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.zeros(100), np.ones(200)].astype(int)
    block = np.r_[np.ones(100), np.zeros(100), np.ones(200)].astype(bool)
    patient = np.r_[np.zeros(100), np.ones(100), np.ones(200)].astype(bool)
    # block normals score higher (an earlier acquisition looks more like PNEUMONIA)
    p = np.r_[rng.uniform(0.3, 0.7, 100), rng.uniform(0.0, 0.4, 100), rng.uniform(0.6, 1.0, 200)]
    t_plain, _ = choose_threshold_robust(y[patient], {"clean": p[patient]})
    t_views, rule = choose_threshold_robust(y, {"clean": p}, {"block": block, "patient": patient})
    assert "x 2 views" in rule
    assert t_plain < 0.6 < t_views  # pushed up above most block normals
    spec_block = float(np.mean(p[block & (y == 0)] < t_views))
    assert spec_block >= 0.95
