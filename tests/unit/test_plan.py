"""Store resolution: a layer named by id, prefix or directory, its chain through l/, and explicit -o layers.

Stores are written into a temporary directory with StoreWriter, then broken
in the ways a damaged or hostile store is; every error is one line that
names the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from ovlfuse.errors import OvlError
from ovlfuse.store.options import parse_options
from ovlfuse.store.plan import LayerNotFound, MountPlan, check_upper_free, find_layer, plan_from_options, \
    plan_from_store, read_chain
from ovlfuse.tools.demo import LayerRef, StoreWriter


@dataclass
class Store:
    root: str
    base: LayerRef  # committed
    middle: LayerRef  # committed
    top: LayerRef  # the container layer


@pytest.fixture
def store(tmp_path) -> Store:
    sw = StoreWriter(str(tmp_path / "overlay2"), link_length=6)
    base = sw.layer(seed="base")
    sw.commit(base)
    middle = sw.layer(base, seed="middle")
    sw.commit(middle)
    return Store(sw.root, base, middle, sw.layer(middle, seed="top"))


def error(call, *args) -> str:
    with pytest.raises(OvlError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def diff(layer: LayerRef) -> str:
    return os.path.realpath(layer.diff)


# --- naming a layer ------------------------------------------------------------------------------------

def test_a_layer_by_id_prefix_and_directory(store, monkeypatch):
    top_dir = os.path.join(store.root, store.top.id)
    assert find_layer(store.root, store.top.id) == top_dir
    assert find_layer(store.root, store.top.id[:12]) == top_dir
    assert find_layer(store.root, store.top.id[:40]) == top_dir
    assert find_layer("/nonexistent", store.top.dir) == store.top.dir  # a directory needs no root
    monkeypatch.chdir(store.root)
    assert find_layer("/nonexistent", f"./{store.top.id}") == top_dir
    monkeypatch.chdir(top_dir)
    assert find_layer("/nonexistent", ".") == top_dir
    assert find_layer("/nonexistent", "..") == store.root


def test_an_id_prefix_must_be_long_and_unique(tmp_path):
    sw = StoreWriter(str(tmp_path / "s"))
    a = sw.layer(layer_id="abcdef012345" + "0" * 52)
    sw.layer(layer_id="abcdef012345" + "1" * 52)
    sw.layer(layer_id="abcdef012345" + "1" * 52 + "-init")
    assert error(find_layer, sw.root, "abcdef01234") == ("layer id prefix 'abcdef01234' is too short: "
                                                         "give at least 12 hex digits")
    assert error(find_layer, sw.root, "abcdef012345") == (
        f"layer id prefix 'abcdef012345' is ambiguous in {sw.root} (2 layers: abcdef0123450000, "
        "abcdef0123451111...); give more characters")
    assert find_layer(sw.root, "abcdef0123450") == a.dir
    assert find_layer(sw.root, "abcdef012345-init") == a.dir.replace("0" * 52, "1" * 52) + "-init"
    assert error(find_layer, sw.root, "abcdef01234-init").startswith("layer id prefix 'abcdef01234-init' is too short")


@pytest.mark.parametrize("name", ["web", "l", "ABCDEF012345", "abcdef012345-other", "a/b:c"])
def test_names_that_are_no_layer(store, name):
    with pytest.raises(LayerNotFound) as caught:
        find_layer(store.root, name)
    assert str(caught.value) == (
        f"no layer {name!r} in {store.root}: a layer is named by its id (64 hex digits or a unique prefix of at "
        "least 12), its directory, or a container or image name")


def test_an_id_no_layer_has(store):
    with pytest.raises(LayerNotFound) as caught:
        find_layer(store.root, "0123456789ab")
    assert str(caught.value) == f"no layer '0123456789ab' in {store.root}; list the store with 'ls {store.root}'"


def test_a_missing_root_or_layer_directory(store, tmp_path):
    missing = str(tmp_path / "missing")
    assert error(find_layer, missing, store.top.id) == (
        f"store root {missing} does not exist or is not a directory; pass --root DIR or set OVLFUSE_ROOT to your "
        "overlay2 directory")
    assert error(find_layer, store.root, missing) == f"layer directory {missing} does not exist"


def test_a_root_the_user_cannot_reach(store, tmp_path):
    parent = os.path.dirname(store.root)
    os.chmod(parent, 0o600)
    try:
        if os.geteuid() == 0:  # root reaches it anyway
            assert find_layer(store.root, store.top.id) == store.top.dir
        else:
            assert error(find_layer, store.root, store.top.id) == (
                f"cannot reach store root {store.root}: permission denied; run as a user who may read it "
                "(an engine's own store is root's)")
    finally:
        os.chmod(parent, 0o700)


# --- the chain ------------------------------------------------------------------------------------------

def test_plans(store):
    top = plan_from_store(store.root, store.top.id, read_only=False)
    assert top == MountPlan(lowers=[diff(store.middle), diff(store.base)], upper=diff(store.top),
                            workdir=os.path.realpath(os.path.join(store.top.dir, "work")), label=store.top.id)
    assert not top.read_only
    assert plan_from_store(store.root, store.top.id[:12], read_only=True) == MountPlan(
        lowers=[diff(store.top), diff(store.middle), diff(store.base)], label=store.top.id)
    # a committed layer mounts read-only, its diff as the topmost lower
    assert plan_from_store(store.root, store.middle.id, read_only=False) == MountPlan(
        lowers=[diff(store.middle), diff(store.base)], label=store.middle.id)
    base = plan_from_store(store.root, store.base.id, read_only=False)
    assert base == MountPlan(lowers=[diff(store.base)], label=store.base.id) and base.read_only
    # by directory, the store is the directory's parent
    assert plan_from_store("/nonexistent", store.top.dir, read_only=False) == top


def test_as_read_only():
    plan = MountPlan(lowers=["/l1", "/l2"], upper="/u", workdir="/w", label="x")
    assert plan.as_read_only() == MountPlan(lowers=["/u", "/l1", "/l2"], label="x")
    assert plan.as_read_only().as_read_only() == plan.as_read_only()


def test_read_chain_of_a_base_layer_is_empty(store):
    assert read_chain(store.root, store.base.dir) == []
    assert read_chain(store.root, store.top.dir) == [diff(store.middle), diff(store.base)]


def _lower(store: Store, text: str | bytes) -> None:
    with open(os.path.join(store.top.dir, "lower"), "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def _top_error(store: Store) -> str:
    return error(plan_from_store, store.root, store.top.id, False)


@pytest.mark.parametrize("entry", ["l/../../etc", "x/ABCDEF", "l/", "l/a/b", "/abs", "ABCDEF", "l/a.b"])
def test_lower_entries_not_of_the_form_l_link(store, entry):
    _lower(store, f"l/{store.middle.link}:{entry}")
    assert _top_error(store) == (f"layer {store.top.id}: lower entry {entry!r} is not of the form l/<LINK>; "
                                 "the store is damaged")


def test_an_empty_entry(store):
    _lower(store, f"l/{store.middle.link}::l/{store.base.link}")
    assert _top_error(store) == f"layer {store.top.id}: lower entry '' is not of the form l/<LINK>; the store is damaged"


def test_a_missing_link(store):
    _lower(store, "l/NOSUCH")
    assert _top_error(store) == (f"layer {store.top.id}: lower names l/NOSUCH, but {store.root}/l/NOSUCH does not "
                                 "exist (a parent layer is missing; pull or rebuild the image)")


def test_a_dangling_link(store):
    os.symlink("../gone/diff", os.path.join(store.root, "l", "GONE"))
    _lower(store, "l/GONE")
    assert _top_error(store) == f"{store.root}/l/GONE dangles: ../gone/diff does not exist (a parent layer was removed)"


def test_a_link_out_of_the_store(store, tmp_path):
    os.symlink(str(tmp_path), os.path.join(store.root, "l", "OUT"))
    os.symlink("../../elsewhere/diff", os.path.join(store.root, "l", "UP"))
    _lower(store, "l/OUT")
    assert _top_error(store) == f"{store.root}/l/OUT points outside the store root ({tmp_path}); refusing to use it"
    _lower(store, "l/UP")
    assert _top_error(store) == (f"{store.root}/l/UP points outside the store root (../../elsewhere/diff); "
                                 "refusing to use it")


@pytest.mark.parametrize("target", ["../{id}", "../{id}/work", "../{id}/diff/..", ".", "../l"])
def test_a_link_to_something_else_than_a_diff(store, target):
    target = target.format(id=store.middle.id)
    os.symlink(target, os.path.join(store.root, "l", "ODD"))
    _lower(store, "l/ODD")
    assert _top_error(store) == f"{store.root}/l/ODD points to {target}, which is not a layer's diff directory"


def test_a_link_that_is_no_symlink(store):
    os.mkdir(os.path.join(store.root, "l", "PLAIN"))
    _lower(store, "l/PLAIN")
    assert _top_error(store) == f"{store.root}/l/PLAIN is not a symlink; the store's l/ directory is damaged"


def test_a_chain_naming_a_layer_twice_or_itself(store):
    _lower(store, f"l/{store.middle.link}:l/{store.base.link}:l/{store.middle.link}")
    assert _top_error(store) == (f"layer {store.top.id}: its lower chain lists l/{store.middle.link} twice; "
                                 "the store is damaged")
    _lower(store, f"l/{store.middle.link}:l/{store.top.link}")
    assert _top_error(store) == (f"layer {store.top.id}: its lower chain lists l/{store.top.link}, its own diff; "
                                 "the store is damaged")


@pytest.mark.parametrize("text", ["", "\n", "  \n"])
def test_an_empty_lower_file(store, text):
    _lower(store, text)
    assert _top_error(store) == f"{store.top.dir}/lower is empty; the layer's chain is damaged"


def test_a_lower_file_that_is_not_text_or_not_a_file(store):
    _lower(store, b"l/\xff")
    assert _top_error(store) == (f"cannot read {store.top.dir}/lower: 'utf-8' codec can't decode byte 0xff in "
                                 "position 2: invalid start byte")
    os.unlink(os.path.join(store.top.dir, "lower"))
    os.mkdir(os.path.join(store.top.dir, "lower"))
    assert _top_error(store).startswith(f"cannot read {store.top.dir}/lower: [Errno 21] Is a directory")


@pytest.mark.parametrize("target", ["nowhere", "../{middle}/lower"])
def test_a_lower_file_that_is_a_symlink(store, target):
    """Dangling, it made the layer look like a base layer: the mount showed the upper dir alone."""
    lower = os.path.join(store.top.dir, "lower")
    os.unlink(lower)
    os.symlink(target.format(middle=store.middle.id), lower)
    assert _top_error(store) == f"{lower} is a symlink; refusing to follow it out of the layer (the store is damaged)"


def test_a_diff_that_is_missing_or_a_symlink(store, tmp_path):
    os.rename(store.top.diff, store.top.diff + ".moved")
    assert _top_error(store) == (f"layer diff {store.top.diff} is missing or not a directory; "
                                 "is this an overlay2 layer?")
    os.symlink(store.top.diff + ".moved", store.top.diff)
    assert _top_error(store) == (f"layer diff {store.top.diff} is a symlink; refusing to follow it out of the layer")


def test_root_written_layers_refused_to_another_user(store, monkeypatch):
    """An ordinary user cannot read trusted.overlay.* markers: a root-written diff would show a wrong view."""
    fake_uid = 54321
    monkeypatch.setattr(os, "geteuid", lambda: fake_uid)
    if os.stat(store.top.diff).st_uid == 0:  # written by root: refused to the (pretended) ordinary user
        assert _top_error(store) == (f"{diff(store.top)} was written by root: its trusted.overlay.* markers (opaque "
                                     f"directories) are invisible to uid {fake_uid}, so the merged view would be "
                                     "wrong; mount it as root")
    else:  # written by an ordinary user: read by any other
        assert plan_from_store(store.root, store.top.id, False).upper == diff(store.top)


def test_an_unmounted_layer_is_free(store):
    plan = plan_from_store(store.root, store.top.id, False)
    assert check_upper_free(plan) is None
    assert check_upper_free(plan.as_read_only()) is None


# --- explicit layers (-o) -----------------------------------------------------------------------------

@pytest.fixture
def dirs(tmp_path) -> dict[str, str]:
    names = ("l1", "l2", "upper", "work", "l1/inner", "upper/inner")
    for name in names:
        os.mkdir(tmp_path / name)
    os.symlink(tmp_path / "l2", tmp_path / "l2-link")
    return {name: str(tmp_path / name) for name in (*names, "l2-link")} | {"": str(tmp_path)}


def _plan(text: str, label: str | None = None) -> MountPlan:
    return plan_from_options(parse_options([text]), label)


def test_explicit_layers(dirs):
    d = dirs
    assert _plan(f"lowerdir={d['l1']}:{d['l2-link']}") == MountPlan(lowers=[d["l1"], d["l2"]], label="ovlfuse")
    rw = _plan(f"lowerdir={d['l1']},upperdir={d['upper']},workdir={d['work']},fsname=src", "given")
    assert rw == MountPlan(lowers=[d["l1"]], upper=d["upper"], workdir=d["work"], label="given")
    assert _plan(f"lowerdir={d['l1']},upperdir={d['upper']},workdir={d['work']},fsname=src").label == "src"
    assert _plan(f"lowerdir={d['l1']},upperdir={d['upper']},workdir={d['work']},ro") == MountPlan(
        lowers=[d["upper"], d["l1"]], label="ovlfuse")


def test_explicit_layers_that_are_missing(dirs):
    d = dirs
    assert error(_plan, "ro") == "-o needs lowerdir=DIR[:DIR...] (and upperdir=, workdir= for a writable mount)"
    assert error(_plan, f"lowerdir={d['l1']}:{d['']}/nope") == f"lowerdir {d['']}/nope does not exist or is not a directory"
    assert error(_plan, f"lowerdir={d['l1']},upperdir={d['upper']}") == (
        "upperdir needs workdir=DIR on the same filesystem, as for the kernel's overlay")
    assert error(_plan, f"lowerdir={d['l1']},upperdir={d['']}/nope,workdir={d['work']}") == (
        f"upperdir {d['']}/nope does not exist or is not a directory")
    assert error(_plan, f"lowerdir={d['l1']},upperdir={d['upper']},workdir=/dev/null") == (
        "workdir /dev/null does not exist or is not a directory")


def test_a_workdir_on_another_filesystem(dirs):
    assert error(_plan, f"lowerdir={dirs['l1']},upperdir={dirs['upper']},workdir=/proc/self") == (
        f"workdir /proc/self must be on the same filesystem as upperdir {dirs['upper']}")


@pytest.mark.parametrize("lowers, upper, work, named", [
    ("l1:l1", None, None, ("lowerdir l1", "lowerdir l1", "are the same directory")),
    ("l2:l2-link", None, None, ("lowerdir l2", "lowerdir l2-link", "are the same directory")),
    ("l1:l1/inner", None, None, ("lowerdir l1", "lowerdir l1/inner", "overlap (one is inside the other)")),
    ("l1/inner:l2:l1", None, None, ("lowerdir l1/inner", "lowerdir l1", "overlap (one is inside the other)")),
    ("l1", "upper", "upper", ("upperdir upper", "workdir upper", "are the same directory")),
    ("l1", "upper", "upper/inner", ("upperdir upper", "workdir upper/inner", "overlap (one is inside the other)")),
    ("upper", "upper", "work", ("upperdir upper", "lowerdir upper", "are the same directory")),
    ("upper/inner", "upper", "work", ("upperdir upper", "lowerdir upper/inner", "overlap (one is inside the other)")),
    ("", "upper", "work", ("upperdir upper", "lowerdir ", "overlap (one is inside the other)")),  # the lower holds all
    ("l1:work", "upper", "work", ("workdir work", "lowerdir work", "are the same directory")),
])
def test_overlapping_layers_are_refused(dirs, lowers, upper, work, named):
    """As the kernel's overlay refuses them: a write through the upper would otherwise change a lower."""
    def path(name: str) -> str:
        return os.path.join(dirs[""], name) if name else dirs[""]

    text = "lowerdir=" + ":".join(path(n) for n in lowers.split(":"))
    if upper:
        text += f",upperdir={path(upper)},workdir={path(work)}"
    (opt_a, a), (opt_b, b) = (part.split(" ") for part in named[:2])
    assert error(_plan, text) == (f"{opt_a} {path(a)} and {opt_b} {path(b)} {named[2]}; give separate directories, "
                                  "as for the kernel's overlay")


def test_an_upper_at_the_root_holds_every_other_layer(dirs):
    assert error(_plan, f"lowerdir={dirs['l1']},upperdir=/,workdir={dirs['work']}") == (
        f"upperdir / and workdir {dirs['work']} overlap (one is inside the other); give separate directories, "
        "as for the kernel's overlay")
