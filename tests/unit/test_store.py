"""The filter store (filter-language.md §11): UUID rules, loops, undefine, overrides, files."""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from pathlib import Path

import pytest

from libvirt_nwfilter.errors import ConflictError, NwfilterError, UnknownFilterError, ValidationError
from libvirt_nwfilter.model import Filter
from libvirt_nwfilter.store import FILE_HEADER, FilterStore, Origin, referencing
from libvirt_nwfilter.xml import MAX_DOCUMENT_BYTES, format_filter, parse_filter

U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"
OWN = ("clean-traffic-dualstack", "no-dhcpv6-server", "no-ipv6-ra", "no-nd-spoofing")
BUILTINS = 24 + len(OWN)  # libvirt's and ours


@pytest.fixture
def store(tmp_path) -> FilterStore:
    return FilterStore(tmp_path)


def doc(name: str, *refs: str, uuid: str | None = None, priority: int = 500) -> str:
    body = f"<uuid>{uuid}</uuid>" if uuid else ""
    body += f"<rule action='drop' direction='in' priority='{priority}'/>"
    body += "".join(f"<filterref filter='{ref}'/>" for ref in refs)
    return f"<filter name='{name}'>{body}</filter>"


def define(store: FilterStore, xml: str):
    flt = store.prepare(parse_filter(xml, "test"))
    store.write(flt)
    return flt


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Define, replace, UUIDs


def test_define_new_without_uuid_gets_random_uuid(store, tmp_path):
    flt = define(store, doc("a"))
    assert str(uuidlib.UUID(flt.uuid)) == flt.uuid
    path = tmp_path / "filters" / "a.xml"
    assert path.read_text() == FILE_HEADER.format(name="a") + format_filter(flt)
    other = define(store, doc("b"))
    assert other.uuid != flt.uuid


def test_define_persists_across_instances(store, tmp_path):
    flt = define(store, doc("a", "b", uuid=U1.upper()))
    assert flt.uuid == U1
    again = FilterStore(tmp_path).get("a")
    assert again == flt


def test_redefine_without_uuid_keeps_stored_uuid(store, tmp_path):
    first = define(store, doc("a", uuid=U1))
    second = define(store, doc("a", priority=100))
    assert second.uuid == first.uuid == U1
    fresh = FilterStore(tmp_path).get("a")
    assert fresh.uuid == U1 and fresh.entries[0].priority == 100


def test_redefine_same_uuid_replaces(store, tmp_path):
    define(store, doc("a", uuid=U1))
    define(store, doc("a", uuid=U1, priority=7))
    assert FilterStore(tmp_path).get("a").entries[0].priority == 7


def test_same_name_other_uuid_refused(store, tmp_path):
    define(store, doc("a", uuid=U1))
    before = snapshot(tmp_path)
    with pytest.raises(ConflictError, match=f"filter 'a' already exists with uuid {U1}"):
        store.prepare(parse_filter(doc("a", uuid=U2)))
    assert snapshot(tmp_path) == before


def test_same_uuid_other_name_refused(store, tmp_path):
    define(store, doc("a", uuid=U1))
    before = snapshot(tmp_path)
    with pytest.raises(ConflictError, match=r"same UUID but different name \('a'\)"):
        store.prepare(parse_filter(doc("b", uuid=U1)))
    assert snapshot(tmp_path) == before
    assert store.lookup("b") is None


def test_uuid_of_a_builtin_refused_for_another_name(store):
    builtin = store.get("allow-arp")
    with pytest.raises(ConflictError, match="allow-arp"):
        store.prepare(parse_filter(doc("mine", uuid=builtin.uuid)))


def test_builtin_uuids_stable_and_distinct(store, tmp_path):
    uuids = {name: flt.uuid for name, flt in store.all().items()}
    assert len(uuids) == BUILTINS and len(set(uuids.values())) == BUILTINS
    assert {name: flt.uuid for name, flt in FilterStore(tmp_path / "other").all().items()} == uuids


# --------------------------------------------------------------------------------------------
# Loops and references


def test_self_reference_is_a_loop(store, tmp_path):
    with pytest.raises(ConflictError, match="loop"):
        store.prepare(parse_filter(doc("a", "a")))
    assert not (tmp_path / "filters").exists() or snapshot(tmp_path) == {}


def test_two_filter_loop(store):
    define(store, doc("a", "b"))  # forward reference
    with pytest.raises(ConflictError, match="loop"):
        store.prepare(parse_filter(doc("b", "a")))
    assert store.lookup("b") is None


def test_indirect_loop_names_the_path(store):
    define(store, doc("a", "b"))
    define(store, doc("b", "c"))
    with pytest.raises(ConflictError) as info:
        store.prepare(parse_filter(doc("c", "x", "a")))
    assert "c -> a -> b -> c" in str(info.value)


def test_redefinition_that_closes_a_loop(store):
    define(store, doc("a"))
    define(store, doc("b", "a"))
    with pytest.raises(ConflictError, match="loop"):
        store.prepare(parse_filter(doc("a", "b")))
    assert store.get("a").references() == ()


def test_loop_through_a_builtin_override(store):
    define(store, doc("mine"))
    define(store, "<filter name='allow-arp' chain='arp'><filterref filter='mine'/></filter>")
    with pytest.raises(ConflictError, match="loop"):
        store.prepare(parse_filter(doc("mine", "allow-arp")))


def test_forward_references_and_diamonds_allowed(store):
    define(store, doc("top", "left", "right"))
    define(store, doc("left", "bottom"))
    define(store, doc("right", "bottom", "bottom"))
    define(store, doc("bottom", "not-yet-defined"))
    assert referencing(store.all(), ["top"], "bottom")
    assert not referencing(store.all(), ["left"], "right")


def test_self_reference_message(store):
    with pytest.raises(ConflictError, match="a -> a"):
        store.prepare(parse_filter(doc("a", "b", "a")))


def test_loop_check_visits_each_filter_once(store, mocker):
    """41 levels, each including the next one twice: 2**41 paths but 42 filters; the loop check
    reads each filter's references once (a walk of every path fails at once, not after days)."""
    for level in range(40, -1, -1):
        define(store, doc(f"l{level}", f"l{level + 1}", f"l{level + 1}"))
    reads = []
    original = Filter.references

    def counted(self):
        reads.append(self.name)
        assert len(reads) <= 42, f"references read {len(reads)} times: every path is walked"
        return original(self)

    mocker.patch.object(Filter, "references", counted)
    with pytest.raises(ConflictError, match="loop"):
        store.prepare(parse_filter(doc("l41", "l0")))
    assert len(reads) == len(set(reads))


def test_loop_elsewhere_does_not_hang(store, tmp_path):
    # a pre-existing loop among stored files (written behind the store's back) must not hang
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "p.xml").write_text(doc("p", "q"))
    (tmp_path / "filters" / "q.xml").write_text(doc("q", "p"))
    assert define(store, doc("new", "p")).name == "new"


# --------------------------------------------------------------------------------------------
# Undefine, built-ins, overrides


def test_undefine_user_filter(store, tmp_path):
    define(store, doc("a"))
    removed = store.remove("a")
    assert removed.name == "a"
    assert not (tmp_path / "filters" / "a.xml").exists()
    assert store.lookup("a") is None and FilterStore(tmp_path).lookup("a") is None
    with pytest.raises(UnknownFilterError):
        store.remove("a")


def test_undefine_builtin_refused(store):
    with pytest.raises(ConflictError, match="built in"):
        store.remove("clean-traffic")
    assert store.get("clean-traffic").name == "clean-traffic"


def test_override_of_a_builtin(store, tmp_path):
    builtin = store.get("allow-arp")
    assert store.origin("allow-arp") is Origin.BUILTIN
    override = define(store, "<filter name='allow-arp' chain='arp'><rule action='drop' direction='in'/></filter>")
    assert override.uuid == builtin.uuid  # no <uuid>: the existing (built-in) one is kept
    assert store.origin("allow-arp") is Origin.OVERRIDE
    assert FilterStore(tmp_path).get("allow-arp").entries[0].action.value == "drop"
    assert len(store.all()) == BUILTINS
    store.remove("allow-arp")
    assert store.origin("allow-arp") is Origin.BUILTIN
    assert store.get("allow-arp") == builtin
    with pytest.raises(ConflictError):
        store.remove("allow-arp")


def test_origins(store):
    define(store, doc("mine"))
    assert store.origin("mine") is Origin.USER
    assert store.origin("no-arp-spoofing") is Origin.BUILTIN
    assert {store.origin(name) for name in OWN} == {Origin.OWN}
    assert all(store.origin(name).shipped for name in ("no-arp-spoofing", *OWN))
    assert not store.origin("mine").shipped


def test_own_filters_and_libvirt_filters_do_not_share_a_name(store):
    libvirt = {p.stem for p in store.builtin_dir.glob("*.xml")}
    own = {p.stem for p in store.own_dir.glob("*.xml")}
    assert len(libvirt) == 24 and own == set(OWN) and not libvirt & own


def test_override_of_an_own_filter(store, tmp_path):
    shipped = store.get("no-ipv6-ra")
    override = define(store, "<filter name='no-ipv6-ra'><rule action='drop' direction='out'/></filter>")
    assert override.uuid == shipped.uuid and store.origin("no-ipv6-ra") is Origin.OVERRIDE
    store.remove("no-ipv6-ra")
    assert store.origin("no-ipv6-ra") is Origin.OWN and store.get("no-ipv6-ra") == shipped
    with pytest.raises(ConflictError, match="built in"):
        store.remove("no-ipv6-ra")


def test_find_by_name_or_uuid(store):
    define(store, doc("a", uuid=U1))
    assert store.find(U1).name == "a"
    assert store.find(U1.upper()).name == "a"
    assert store.find("a").uuid == U1
    builtin = store.get("clean-traffic")
    assert store.find(builtin.uuid).name == "clean-traffic"
    with pytest.raises(UnknownFilterError):
        store.find(U2)


# --------------------------------------------------------------------------------------------
# Files


def test_atomic_write_leaves_no_temp_files(store, tmp_path):
    for i in range(5):
        define(store, doc(f"f{i}"))
        define(store, doc(f"f{i}", priority=i))
    assert sorted(os.listdir(tmp_path / "filters")) == [f"f{i}.xml" for i in range(5)]


def test_failed_write_keeps_old_file_and_no_temp(store, tmp_path, monkeypatch):
    define(store, doc("a", uuid=U1))
    before = snapshot(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(NwfilterError, match=r"cannot write .*a\.xml: No space left on device"):
        define(store, doc("a", uuid=U1, priority=1))
    assert snapshot(tmp_path) == before
    assert os.listdir(tmp_path / "filters") == ["a.xml"]


def test_names_sorted_case_insensitively(store):
    for name in ("Zeta", "alpha", "Beta", "zed"):
        define(store, doc(name))
    names = store.names()
    assert len(names) == BUILTINS + 4
    assert names == sorted(names, key=str.lower)
    assert names.index("alpha") < names.index("Beta") < names.index("zed") < names.index("Zeta")


def test_invalid_file_names_are_ignored(store, tmp_path):
    user = tmp_path / "filters"
    user.mkdir()
    (user / ".hidden.xml").write_text(doc(".hidden"))
    (user / "1abc.xml").write_text(doc("1abc"))
    (user / "notes.txt").write_text("x")
    (user / ".a.xml.tmp123").write_text("partial")
    assert len(store.all()) == BUILTINS
    assert store.lookup("../filters/x") is None


def test_unreadable_user_files_skipped_by_all(store, tmp_path, monkeypatch, caplog):
    define(store, doc("good"))
    user = tmp_path / "filters"
    (user / "broken.xml").write_text("<filter name='broken'>")  # malformed
    (user / "invalid.xml").write_text("<filter name='invalid'><rule action='x' direction='in'/></filter>")
    (user / "mismatch.xml").write_text(doc("other-name"))
    (user / "denied.xml").write_text(doc("denied"))
    (user / "binary.xml").write_bytes(b"\xff\xfe\x00garbage")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "denied.xml":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    fresh = FilterStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        found = fresh.all()
    assert "good" in found and len(found) == BUILTINS + 1
    for name in ("broken", "invalid", "mismatch", "denied", "binary"):
        assert name not in found
        assert any(name in record.getMessage() for record in caplog.records), name
    with pytest.raises(ValidationError):
        fresh.get("broken")
    with pytest.raises(NwfilterError, match="cannot read"):
        fresh.get("denied")


def test_file_name_must_match_filter_name(store, tmp_path):
    user = tmp_path / "filters"
    user.mkdir()
    (user / "x.xml").write_text(doc("y"))
    with pytest.raises(NwfilterError, match="does not match"):
        store.get("x")
    assert store.lookup("y") is None
    assert "x" not in store.all() and "y" not in store.all()
    # defining the real 'y' works and does not touch x.xml
    define(store, doc("y"))
    assert store.get("y").name == "y"
    assert (user / "x.xml").read_text() == doc("y")


def test_stored_file_reads_back_identically(store, tmp_path):
    xml = ("<filter name='p' chain='mac' priority='0'><rule action='accept' direction='out'>"
           "<mac srcmacaddr='$MAC'/></rule></filter>")
    flt = define(store, xml)
    assert FilterStore(tmp_path).get("p") == flt
    assert FilterStore(tmp_path).get("p").effective_priority == flt.effective_priority


def test_definition_too_large_to_read_back_is_refused(store, tmp_path):
    # The canonical form is longer than compact input (priority='500', indentation), so an
    # accepted document can exceed the size limit once stored, and would then be unreadable.
    rule = "<rule action='drop' direction='in'/>"
    xml = "<filter name='big'>" + rule * ((MAX_DOCUMENT_BYTES - 100) // len(rule)) + "</filter>"
    flt = parse_filter(xml)
    with pytest.raises(ValidationError, match="too large"):
        store.prepare(flt)
    assert store.lookup("big") is None and snapshot(tmp_path) == {}
    smaller = define(store, "<filter name='big'>" + rule * 15000 + "</filter>")
    assert FilterStore(tmp_path).get("big").entries == smaller.entries
