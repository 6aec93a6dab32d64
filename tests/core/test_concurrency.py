"""Concurrent writers and killed writes with real processes (``subprocess``; ``spell_core`` alone, no ComfyUI):
the batch memory and the fairness running count lose nothing, a killed write leaves no temporary behind the next
load or write, and a lock held too long gives a clear error with the file unchanged. The drivers live in
``tools/soak_memory.py`` (``python -m tools.soak_memory`` runs them longer and writes docs/reliability_soak.md)."""
import os
import subprocess
import sys

import pytest
import torch

from spell_core.fairness import FairnessCount
from spell_core.memory import BatchMemory, LockTimeout, open_memory
from spell_core.storage import atomic_write_json, remove_stale_temporaries
from tools.soak_memory import kill_writes, lock_timeout, two_writers_count, two_writers_memory

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL and flock semantics: POSIX only")


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_appending_to_one_memory_lose_nothing(tmp_path, round_):
    r = two_writers_memory(tmp_path, batches=10)
    assert r["entries"] == 20 and r["before"] == 0  # the in-process reader sees both processes' appends
    assert r["in_order"]  # each writer's 10 entries, in its order
    assert r["files"] == ["shared.safetensors", "shared.safetensors.lock"]  # no temporary left


def test_two_processes_adding_to_one_running_count_lose_nothing(tmp_path):
    r = two_writers_count(tmp_path, runs=10)
    assert r["runs"] == 20 and r["counts"] == [10, 10]
    assert r["files"] == ["shared.json", "shared.json.lock"]


def test_sigkill_during_memory_writes_keeps_the_committed_prefix_and_leaves_no_temporary(tmp_path):
    records = kill_writes(tmp_path, tries=10, seed=0)
    assert [r for r in records if r["error"]] == []
    assert records[-1]["entries"] > 0


def test_a_lock_held_beyond_the_timeout_gives_a_clear_error_and_changes_nothing(tmp_path):
    r = lock_timeout(tmp_path, timeout=0.5)
    for name, file in (("memory", "held.safetensors"), ("count", "held.json")):
        v = r[name]
        assert v["message"] and str(tmp_path / file) in v["message"] and "another process" in v["message"]
        assert "nothing was written" in v["message"] and v["unchanged"]
        assert 0.4 < v["waited"] < 5
        assert v["after_kill"] == 2  # the killed holder's lock is released by the OS: the next write goes through


def test_stale_temporaries_of_this_file_only_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: no process with this pid (unless reused at once, then it is younger)
    path = tmp_path / "m.safetensors"
    names = {
        f"m.safetensors.{dead_pid}-abc123xy.tmp": False,  # a killed write of this file: removed
        f"m.safetensors.{os.getpid()}-live0000.tmp": True,  # a live writer (this process): kept
        f"other.safetensors.{dead_pid}-abc123xy.tmp": True,  # another file's temporary: kept
        f"m.safetensors.x.{dead_pid}-abc123xy.tmp": True,  # the temporary of m.safetensors.x: kept
        "m.safetensors.lock": True,
        "notes.txt": True,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    old = tmp_path / "m.safetensors.k2j3h4g5.tmp"  # an earlier version's name (no pid), two hours old: removed
    old.write_bytes(b"x")
    os.utime(old, (old.stat().st_mtime - 7200,) * 2)
    BatchMemory(path, 4).append(torch.zeros(1, 4, 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([n for n, keep in names.items() if keep]
                                                                 + ["m.safetensors"])
    # the JSON writer does the same for its file
    (tmp_path / f"c.json.{dead_pid}-zz.tmp").write_text("{")
    atomic_write_json(tmp_path / "c.json", {"a": 1})
    assert not (tmp_path / f"c.json.{dead_pid}-zz.tmp").exists()
    assert remove_stale_temporaries(path) == []


def test_registry_rereads_a_file_changed_by_another_writer(tmp_path):
    path = tmp_path / "r.safetensors"
    mem = open_memory(path, 10)
    mem.append(torch.zeros(1, 4, 2, 2))
    BatchMemory(path, 10).append(torch.ones(1, 4, 2, 2))  # another writer (its own copy, its own lock handle)
    assert len(mem) == 2 and mem.append(torch.full((1, 4, 2, 2), 2.0)) == 3
    assert mem.latents()[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    count, other = FairnessCount(tmp_path / "c.json"), FairnessCount(tmp_path / "c.json")
    count.add(["a", "b"], [0])
    other.add(["a", "b"], [1, 1])
    assert count.runs() == 2 and count.counts(["a", "b"]).tolist() == [1.0, 2.0]


def test_lock_timeout_is_a_storage_error_naming_the_file(tmp_path):
    from spell_core.memory import file_lock
    from spell_core.storage import StorageError

    path = tmp_path / "t.safetensors"
    with file_lock(path, "test"):  # held by another handle (flock locks are per open file)
        with pytest.raises(LockTimeout, match="t.safetensors") as e:
            BatchMemory(path, 4).append(torch.zeros(1, 4, 2, 2), timeout=0.1)
        assert isinstance(e.value, StorageError)
        assert BatchMemory(path, 4).latents() is None  # a reader does not wait for the lock
    assert not path.exists()


# ---- index builds and the encoding cache (drivers in tools/soak_index.py) ----

def test_sigkill_during_index_builds_leaves_whole_files_and_the_next_build_finishes(tmp_path):
    from tools.soak_index import kill_builds

    r = kill_builds(tmp_path, tries=6, seed=0)
    assert [rec for rec in r["records"] if rec["error"]] == []  # every shard, manifest and index whole after a kill
    last = r["records"][-1]
    assert last["finished"] and last["exact"] and last["temporaries_left"] == 0
    assert last["files"] == ["index.safetensors", "index.safetensors.lock", "manifest.json", "source.json"]


def test_two_processes_building_one_index_folder_build_it_once(tmp_path):
    from tools.soak_index import two_builders

    r = two_builders(tmp_path)
    assert r["whats"] == ["already built from the same files: opened as is", "built"]  # the second waited
    assert r["rows"] == 12000
    assert r["files"] == ["index.safetensors", "index.safetensors.lock", "manifest.json", "source.json"]


def test_two_processes_encoding_through_one_cache_get_the_same_latents(tmp_path):
    from tools.soak_index import two_encoders

    r = two_encoders(tmp_path, images=24)
    assert all("error" not in x for x in r["results"]), r["results"]
    assert len({x["sum"] for x in r["results"]}) == 1 and r["results"][2]["encoded"] == 0  # the third: all cached
    assert r["entries"] == r["whole"] == 24 and r["temporaries"] == []


def test_an_index_build_waits_for_another_builds_lock_then_says_so_and_writes_nothing(tmp_path):
    from spell_core.build import build_index_folder
    from spell_core.locking import file_lock

    out = tmp_path / "idx"
    out.mkdir()
    with file_lock(out / "index.safetensors", "another build"):  # another handle: as another process's
        with pytest.raises(LockTimeout, match="index build idx: .*another process") as e:
            build_index_folder(lambda start: iter([torch.randn(8, 4, 2, 2)]), 8, out, {"files": 1},
                               shard_size=8, lock_timeout=0.2)
        assert "nothing was written" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["index.safetensors.lock"]
