"""The KV cache's files on their own (no model runs): keys, checks, atomic writes, eviction."""
from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time

import pytest

import models
from dysco_edge.documents import kv_cache
from dysco_edge.documents.kv_cache import KVCache, KVCacheConfig, cache_key, model_identity, parse_size
from dysco_edge.errors import InputError
from dysco_edge.heads.gguf_meta import gguf_index_end

MODEL = {"size": 1, "header_sha256": "ab"}
CELLS = {"type_k": None, "type_v": None, "flash_attn": False, "n_gpu_layers": 0, "devices": ["cpu"]}


def _key(tokens=(1, 2, 3), model=MODEL, cells=CELLS) -> bytes:
    return cache_key(model, cells, list(tokens))


def test_key_changes_with_each_part_that_decides_the_cells():
    base = _key()
    assert base == _key() and len(base) == 32
    others = [_key((1, 2, 4)), _key((1, 2)), _key(model={**MODEL, "size": 2}),
              _key(model={**MODEL, "header_sha256": "cd"}), _key(cells={**CELLS, "type_k": 8}),
              _key(cells={**CELLS, "flash_attn": True}), _key(cells={**CELLS, "n_gpu_layers": -1})]
    assert len({base, *others}) == len(others) + 1


def test_key_changes_with_our_version(monkeypatch):
    before = _key()
    monkeypatch.setattr(kv_cache, "__version__", "99.0")
    assert _key() != before


def test_model_identity_hashes_header_and_tensor_index_only(tmp_path):
    import gguf
    path = models.smollm2_q4_1()
    assert gguf_index_end(path) <= gguf.GGUFReader(str(path)).data_offset < gguf_index_end(path) + 64
    # the same header on other weights is the same identity; flipping a header byte is not
    copy = tmp_path / "copy.gguf"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(data)
    assert model_identity(copy) == model_identity(path)
    data[gguf_index_end(path) - 5] ^= 0xFF
    copy.write_bytes(data)
    assert model_identity(copy) != model_identity(path)


def test_sizes_and_default_folder(monkeypatch, tmp_path):
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GB") == 3 << 29
    assert parse_size("100") == 100 and parse_size("2GiB") == 2 << 30
    with pytest.raises(InputError, match="not a size"):
        parse_size("lots")
    monkeypatch.delenv("DYSCO_EDGE_KV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert KVCacheConfig().directory == tmp_path / "dysco-edge" / "kv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kv_cache.default_cache_dir() == kv_cache.Path.home() / ".cache" / "dysco-edge" / "kv"
    with pytest.raises(InputError):
        KVCacheConfig(tmp_path, -1)


def test_save_then_load_and_a_miss(tmp_path):
    cache = KVCache(KVCacheConfig(tmp_path / "kv"))
    payload = os.urandom(10_000)
    assert cache.load(_key(), 3) is None  # miss: no folder yet, no warning needed
    assert cache.save(_key(), 3, payload) == cache.path(_key())
    assert cache.load(_key(), 3) == payload
    assert not list((tmp_path / "kv").glob(".*.tmp"))  # no temporary file left behind


def _saved(tmp_path, payload=b"x" * 5000):
    cache = KVCache(KVCacheConfig(tmp_path))
    cache.save(_key(), 3, payload)
    return cache, cache.path(_key())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty", "foreign", "old-version", "overlong"])
def test_a_bad_file_is_ignored_with_one_line_and_removed(tmp_path, capsys, damage):
    cache, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header = kv_cache._HEADER
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "corrupt":
        data[header.size + 100] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    elif damage == "foreign":  # a file saved under another key, renamed onto this one
        data[12:44] = _key((9, 9, 9))
    elif damage == "old-version":
        data[8:12] = struct.pack("<I", kv_cache.FORMAT_VERSION + 1)
    else:
        data += b"junk"
    path.write_bytes(data)
    assert cache.load(_key(), 3) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dysco-edge: warning: ignoring cached cells")
    assert "; removed, prefilling again" in err and not path.exists()


def test_eviction_removes_least_recently_used_first(tmp_path):
    one_file = kv_cache._HEADER.size + 1000
    cache = KVCache(KVCacheConfig(tmp_path, max_bytes=3 * one_file))
    keys = [_key((i,)) for i in range(3)]
    for age, key in enumerate(keys):
        cache.save(key, 1, b"z" * 1000)
        os.utime(cache.path(key), (time.time() - 100 + age, time.time() - 100 + age))
    assert cache.load(keys[0], 1) is not None  # used now: the newest
    cache.save(_key((7,)), 1, b"z" * 1000)  # one over the limit: the least recently used goes
    assert sorted(p.name for _, _, p in cache.entries()) == sorted(
        cache.path(k).name for k in (keys[0], keys[2], _key((7,))))


def test_a_file_over_the_limit_is_not_saved(tmp_path, capsys):
    cache = KVCache(KVCacheConfig(tmp_path, max_bytes=100))
    assert cache.save(_key(), 3, b"y" * 1000) is None
    assert "over the cache limit" in capsys.readouterr().err and not cache.entries()


def test_stale_temporary_files_are_swept(tmp_path):
    cache = KVCache(KVCacheConfig(tmp_path))
    # named as _write_atomic names them (mkstemp: 8 random characters), cut short mid-write
    stale, fresh = tmp_path / ".0123456789abcdef.k2_x9a0q.tmp", tmp_path / ".0123456789abcdef.zz0_1234.tmp"
    stale.write_bytes(kv_cache.MAGIC[:5])
    fresh.write_bytes(kv_cache.MAGIC + b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.save(_key(), 3, b"p")
    assert not stale.exists() and fresh.exists()


def test_eviction_and_clearing_touch_only_files_the_cache_wrote(tmp_path, capsys):
    """`--cache-dir DIR --cache-limit 2M` once removed a user's my-keyvalue-store.kv and .draft.tmp."""
    old = time.time() - 7200
    theirs = {tmp_path / "my-keyvalue-store.kv": b"x" * 50_000, tmp_path / ".draft.tmp": b"notes",
              tmp_path / f"{'ab' * 32}.kv": b"SQLite format 3\0" + b"y" * 50_000,  # our name, not our header
              tmp_path / ".0123456789abcdef.abcdefgh.tmp": b"%PDF-1.4 someone else's"}
    for path, data in theirs.items():
        path.write_bytes(data)
        os.utime(path, (old, old))
    cache = KVCache(KVCacheConfig(tmp_path, max_bytes=kv_cache._HEADER.size + 1500))
    cache.save(_key((1,)), 1, b"a" * 1000)
    cache.save(_key((2,)), 1, b"b" * 1000)  # over the limit: ours, the older, goes
    assert [p for _, _, p in cache.entries()] == [cache.path(_key((2,)))]
    assert cache.clear() == 1
    assert all(path.read_bytes() == data for path, data in theirs.items())
    assert "warning" not in capsys.readouterr().err


def test_a_file_under_a_keys_name_without_our_magic_is_discarded_when_its_key_is_loaded(tmp_path, capsys):
    """Only this cache names a file by a key's sha256, so a bad magic there is damage (a flipped bit),
    removed like any other; eviction, which lists the folder, still leaves such a file alone."""
    cache = KVCache(KVCacheConfig(tmp_path, max_bytes=10))
    path = cache.path(_key())
    path.write_bytes(b"EYSCOKV\0" + b"z" * 100)
    cache.evict()
    assert path.exists() and cache.load(_key(), 3) is None and not path.exists()
    assert "not a dysco-edge KV file); removed" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys, kind):
    """A FIFO where the .kv file should be blocked `run` in open() for ever."""
    import threading
    cache = KVCache(KVCacheConfig(tmp_path / "kv"))
    cache.directory.mkdir()
    path = cache.path(_key())
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "elsewhere").write_bytes(b"z" * 100)
        path.symlink_to(tmp_path / "elsewhere")
    got = []
    reader = threading.Thread(target=lambda: got.append(cache.load(_key(), 3)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive() and kind == "fifo":  # unblock the old code's open() so the test can end
        with open(path, "wb"):
            pass
        reader.join(10)
        pytest.fail("load() blocked on a FIFO")
    assert got == [None] and cache.save(_key(), 3, b"cells") is None
    err = capsys.readouterr().err
    assert err.count("not a regular file") == 2 and "removed" not in err
    assert os.path.lexists(path) and not path.is_file() or path.is_symlink()


@pytest.mark.parametrize("field, value", [("length", 1 << 62), ("length", (1 << 33) + 4),
                                          ("count", 1 << 40), ("version", 0xFFFFFFFF)])
def test_a_header_field_out_of_bounds_is_discarded_before_any_allocation(tmp_path, capsys, field, value):
    """A flipped bit in the length field made load() allocate exabytes: MemoryError, and the file stayed."""
    cache, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    magic, version, digest, count, length, crc = kv_cache._HEADER.unpack_from(data)
    fields = dict(version=version, count=count, length=length)
    fields[field] = value
    data[:kv_cache._HEADER.size] = kv_cache._HEADER.pack(magic, fields["version"], digest, fields["count"],
                                                          fields["length"], crc)
    path.write_bytes(data)
    assert cache.load(_key(), 3) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed, prefilling again" in err and not path.exists()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "infG", "1e400", "NaNM", "2e20T"])
def test_a_size_limit_that_is_not_a_finite_size_is_one_line(text):
    with pytest.raises(InputError, match="a size must be"):
        parse_size(text)


@pytest.mark.parametrize("limit", [float("inf"), float("nan"), 1.5, True, -1, 1 << 70])
def test_the_config_refuses_a_limit_that_is_not_a_whole_number_of_bytes(tmp_path, limit):
    with pytest.raises(InputError, match="cache size limit"):
        KVCacheConfig(tmp_path, limit)


def _writer(directory: str, seed: int, rounds: int) -> None:
    cache = KVCache(KVCacheConfig(directory))
    for i in range(rounds):
        cache.save(_key(), 3, bytes([seed]) * (200_000 + 10 * i))


def test_two_processes_writing_one_key_never_leave_a_bad_file(tmp_path, capsys):
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), seed, 30)) for seed in (1, 2)]
    for w in writers:
        w.start()
    cache, reads = KVCache(KVCacheConfig(tmp_path)), 0
    while any(w.is_alive() for w in writers):
        got = cache.load(_key(), 3)
        if got is not None:
            reads += 1
            assert len(set(got)) == 1  # one writer's whole payload, never a mix
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = cache.load(_key(), 3)
    assert final is not None and len(set(final)) == 1
    assert "warning" not in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [cache.path(_key()).name]
