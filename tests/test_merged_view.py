"""The merged view served by ovlfuse equals the kernel overlay's, path by path."""

from __future__ import annotations

import os

import pytest

from overlaypair import Layers, mount
from stores import fingerprint, kernel_twin, real_origins, rich_store
from treesnap import differences, snapshot

# total layers in the chain -> filler layers between the middle and the image top
DEPTHS = {4: 0, 128: 124, 500: 496}


def _provenance(snap, origins):
    return {path: origins.get(ino) for path, ino in snap.inos.items()}


def _compare(tmp_path, depth: int, which: str) -> None:
    store = rich_store(str(tmp_path / "store"), extra_layers=DEPTHS.get(depth, 0), link_length=6)
    twin = kernel_twin(store, str(tmp_path / "twin"))
    if which == "container":
        layer, ktwin_layer, read_only = store.top, twin.top, False
    elif which == "image":
        layer, ktwin_layer, read_only = store.image_top, twin.image_top, True
    else:  # the base layer alone: a chain of one
        layer, ktwin_layer, read_only = store.layers[-1], twin.layers[-1], True
    kmnt, omnt = (tmp_path / n for n in ("kmnt", "omnt"))
    for d in (kmnt, omnt):
        d.mkdir()
    before = fingerprint(store.root)
    with mount("kernel", Layers.of_layer(twin.root, ktwin_layer, read_only), kmnt):
        expected = snapshot(str(kmnt))
        expected_again = snapshot(str(kmnt))
    with mount("ovlfuse", Layers.of_layer(store.root, layer, read_only), omnt):
        actual = snapshot(str(omnt))
        actual_again = snapshot(str(omnt))
    assert len(expected.records) > 40
    assert differences(expected, actual) == []
    # The kernel gives the upper part's own inode as d_ino of a merged directory
    # in a parent it has not marked impure; ovlfuse keeps d_ino equal to st_ino.
    assert actual.dino_mismatch == []
    assert actual.inos == actual_again.inos, "st_ino changed between two lookups"
    assert expected.inos == expected_again.inos
    # every reported inode number is the one of the same real object the kernel reports
    diffs = [layer.diff] + [os.path.join(store.root, "l", link) for link in layer.chain]
    kdiffs = [ktwin_layer.diff] + [os.path.join(twin.root, "l", link) for link in ktwin_layer.chain]
    assert _provenance(actual, real_origins(diffs)) == _provenance(expected, real_origins(kdiffs))
    assert fingerprint(store.root) == before, "ovlfuse wrote into the store"


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_container_layer_matches_kernel(tmp_path, depth):
    _compare(tmp_path, depth, "container")


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_committed_layer_matches_kernel(tmp_path, depth):
    _compare(tmp_path, depth, "image")


def test_single_layer_chain_matches_kernel(tmp_path):
    _compare(tmp_path, 1, "base")
