"""What a careless or unlucky user does to the catalog and the search commands: usage
slips, odd file names, broken catalogs, full disks, read-only folders, two indexers at
once, killed runs. Each gets exit 2 (usage) or 1 (data) and one line naming the input,
and nothing already indexed is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cliplens.catalog.db import Catalog, CatalogBusyError, CatalogError
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.tasks.search import search
from conftest import make_photos

ODD = os.fsdecode(b"\xff\xfe-cat.jpg")  # a name that is not UTF-8


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_clean_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "unexpected" not in err and "Traceback" not in err, err
    return lines[0]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a real process (aborts and exit-time crashes only show there)."""
    return subprocess.run(
        [sys.executable, "-m", "cliplens.cli.main", *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
        capture_output=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["search"], "Missing argument 'query'"),
        (["search", "--bogus", "cat"], "No such option: --bogus"),
        (["serch", "cat"], "No such command 'serch'"),
        (["search", "cat", "-n", "nan"], "'nan' is not a valid int"),
        (["search", "cat", "-n", "0"], "0 is not in the range"),
        (["search", "cat", "-n", "-5"], "-5 is not in the range"),
        (["similar", "x.jpg", "-n", "-1"], "-1 is not in the range"),
        (["duplicates", ".", "--threshold", "nan"], "threshold"),
        (["index"], "Missing argument 'folders'"),
        (["search", "1" + "0" * 400 + ":cat"], "weight is out of range"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, args, needle):
    code, out, err = run(capsys, *args)
    line = one_clean_line(err)
    assert code == 2 and needle in line and line.startswith("error:"), err
    assert out == ""


def test_a_query_word_too_long_for_a_file_name_is_text(capsys, tmp_path, tiny_model_dir):
    make_photos(tmp_path / "p", 2)
    db = str(tmp_path / "c.db")
    model = f"local:{tiny_model_dir}"
    word = "a" * 300  # over NAME_MAX (255 bytes): once an OSError from Path.is_file()
    where = ["--in", str(tmp_path / "p"), "--db", db, "--model", model]
    code, out, err = run(capsys, "search", word, *where, "-f", "json")
    assert code == 0, err
    assert len(json.loads(out)) == 2


# ------------------------------------------------------------------ broken catalogs


def _newer_schema(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()


def _other_program(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE songs (title TEXT)")
    con.close()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(os.urandom(8192)), "not a cliplens catalog"),
        (lambda p: p.write_bytes(b"x"), "not a cliplens catalog"),  # once silently overwritten
        (_newer_schema, "newer cliplens"),
        (_other_program, "another program"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["random-bytes", "one-byte", "newer-schema", "other-program", "folder"],
)
def test_broken_catalogs_are_refused_whole_and_untouched(tmp_path, make, needle, tiny_model_dir):
    make_photos(tmp_path / "p", 2)
    db = tmp_path / "c.db"
    make(db)
    before = db.read_bytes() if db.is_file() else None
    env = {"CLIPLENS_MODEL": f"local:{tiny_model_dir}"}
    for args in (
        ["search", "a cat", "--in", str(tmp_path / "p")],  # index first, then query
        ["search", "a cat", "--in", str(tmp_path / "p"), "--no-index"],
        ["index", str(tmp_path / "p")],
    ):
        done = cli(*args, "--db", str(db), env=env)
        err = done.stderr.decode()
        assert done.returncode == 1, (args, done.returncode, err)  # never 134 (abort)
        assert needle in one_clean_line(err) and str(db) in err
    if before is not None:
        assert db.read_bytes() == before


def test_search_of_a_missing_folder_exits_1_without_aborting(tmp_path, tiny_model_dir):
    make_photos(tmp_path / "p", 2)
    db = tmp_path / "c.db"
    env = {"CLIPLENS_MODEL": f"local:{tiny_model_dir}"}
    assert cli("index", str(tmp_path / "p"), "--db", str(db), env=env).returncode == 0
    # a text query starts loading the text tower in a thread and the error comes first:
    # the process once aborted at exit (134) when that load was still running; it races,
    # hence a few tries
    for _ in range(3):
        done = cli("search", "a cat", "--in", str(tmp_path / "nope"), "--db", str(db), env=env)
        assert done.returncode == 1, done.stderr
        assert "no such file or folder" in one_clean_line(done.stderr.decode())


# ------------------------------------------------------------------ odd file names


@pytest.fixture
def odd_folder(tmp_path, photos) -> Path:
    """Good photos beside a non-UTF-8 name, a self-symlink, a broken link, an unreadable
    file, and every broken kind of image."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("cat.jpg", "rocket.jpg", "coffee.jpg"):
        shutil.copy(photos / name, folder / name)
    shutil.copy(photos / "cat.jpg", folder / ODD)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "dangling.jpg").symlink_to("nowhere.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a photo")
    (folder / "truncated.jpg").write_bytes((photos / "rocket.jpg").read_bytes()[:300])
    locked = folder / "locked.jpg"
    shutil.copy(photos / "coffee.jpg", locked)
    locked.chmod(0)  # unreadable for a user; root reads it anyway (then it is just good)
    return folder


def test_odd_names_and_broken_files_never_stop_indexing(capsys, odd_folder, tmp_path, offline):
    db = str(tmp_path / "c.db")
    index = ["index", str(odd_folder), "--model", "offline", "--db", db, "-f", "json"]
    code, out, err = run(capsys, *index, "--workers", "0")
    assert code == 0, err
    stats = json.loads(out)
    readable_odd = "\\xff\\xfe-cat.jpg"
    locked = os.geteuid() != 0  # root reads the chmod-0 file: then it is just a good photo
    assert stats["failed"] == 3 + locked, stats
    assert stats["new"] + stats["moved"] == 5 - locked, stats
    assert "unexpected" not in err
    catalog = Catalog(db, readonly=True)
    stored = {Path(p).name for p in catalog.files_under([str(odd_folder)])}
    assert ODD in stored  # lossless: the name the file system has, not a lookalike
    hits = search(catalog, offline, "a cat", 2, [odd_folder])
    assert {Path(h.path).name for h in hits} == {"cat.jpg", ODD}
    # people see the odd bytes as \xNN, in the table and in JSON
    query = ["search", "a cat", "--in", str(odd_folder), "--model", "offline", "--db", db]
    code, out, err = run(capsys, *query, "-n", "2", "--no-index")
    assert code == 0 and readable_odd in out, out
    code, out, _ = run(capsys, *query, "-n", "2", "--no-index", "-f", "json")
    assert code == 0 and readable_odd in {Path(h["path"]).name for h in json.loads(out)}
    # a rerun finds everything unchanged: the stored name matches the file's
    code, out, _ = run(
        capsys, "index", str(odd_folder), "--model", "offline", "--db", db, "-f", "json"
    )
    again = json.loads(out)
    assert code == 0 and again["new"] == 0 and again["changed"] == 0 and again["removed"] == 0


def test_paths_format_writes_the_real_bytes(odd_folder, tmp_path, tiny_model_dir):
    db = str(tmp_path / "c.db")
    env = {"CLIPLENS_MODEL": f"local:{tiny_model_dir}"}
    assert cli("index", str(odd_folder), "--db", db, "--workers", "0", env=env).returncode == 0
    query = ["search", "a cat", "--in", str(odd_folder), "--db", db, "-n", "20", "--no-index"]
    done = cli(*query, "-f", "paths", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert os.fsencode(odd_folder / ODD) in lines
    assert all(Path(os.fsdecode(line)).exists() for line in lines)  # real files for xargs


# ------------------------------------------------------------------ full disks


def _disk_full_after(monkeypatch, pages: int) -> None:
    """Catalogs opened from now on hold at most `pages` more pages: SQLite then answers
    SQLITE_FULL ('database or disk is full'), as on a disk with no space left."""
    connect = Catalog._connect

    def capped(self):
        db = connect(self)
        used = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {used + pages}")
        return db

    monkeypatch.setattr(Catalog, "_connect", capped)


def test_a_full_disk_names_the_catalog_and_keeps_what_was_committed(
    capsys, monkeypatch, tmp_path, tiny_model_dir
):
    make_photos(tmp_path / "p", 40)
    db = tmp_path / "c.db"
    model = f"local:{tiny_model_dir}"
    first = ["index", str(tmp_path / "p" / "img000.jpg"), "--db", str(db), "--model", model]
    assert run(capsys, *first)[0] == 0
    with monkeypatch.context() as m:
        _disk_full_after(m, 3)
        code, _, err = run(
            capsys,
            "index",
            str(tmp_path / "p"),
            "--db",
            str(db),
            "--model",
            model,
            "-b",
            "2",
            "--workers",
            "0",
        )
    line = one_clean_line(err)
    assert code == 1 and "disk is full" in line and str(db) in line, err
    catalog = Catalog(db)
    assert catalog.integrity_check() == "ok"
    kept = len(catalog.files_under([str(tmp_path / "p")]))
    assert 1 <= kept < 40  # the first photo and the batches that fit
    catalog.close()
    code, out, _ = run(
        capsys, "index", str(tmp_path / "p"), "--db", str(db), "--model", model, "-f", "json"
    )
    stats = json.loads(out)
    assert code == 0 and stats["unchanged"] == kept and stats["new"] == 40 - kept


def test_failed_cache_writes_leave_no_temporary_files(monkeypatch, tmp_path, tiny):
    from cliplens.catalog import vectors

    make_photos(tmp_path / "p", 3)
    catalog = Catalog(tmp_path / "c.db")
    update_catalog(catalog, tiny, [tmp_path / "p"], workers=0)

    def no_space(file, array):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vectors.np, "save", no_space)
    vectors._loaded.clear()
    assert len(search(catalog, tiny, "x", 3)) == 3  # the cache is optional: search works
    assert not [p for p in vectors.cache_dir(catalog).glob("*") if p.suffix == ".tmp"]


def test_cache_files_get_the_umask_mode(tmp_path, tiny):
    from cliplens.catalog import vectors

    make_photos(tmp_path / "p", 2)
    catalog = Catalog(tmp_path / "c.db")
    update_catalog(catalog, tiny, [tmp_path / "p"], workers=0)
    search(catalog, tiny, "x", 2)
    mask = os.umask(0o022)
    os.umask(mask)
    files = list(vectors.cache_dir(catalog).glob("*.npy"))
    assert files and all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in files)


# ------------------------------------------------------------------ read-only catalogs


@pytest.fixture
def readonly_folder(tmp_path):
    """A folder nobody can write: a read-only tmpfs for root (who ignores permission
    bits), plain permissions for anyone else."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        yield folder, lambda: folder.chmod(0o555)
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the read-only test: {mounted}"
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_catalog_is_searched_as_it_is(
    capsys, readonly_folder, tmp_path, tiny_model_dir
):
    folder, make_readonly = readonly_folder
    make_photos(tmp_path / "p", 4)
    model = f"local:{tiny_model_dir}"
    built = tmp_path / "built.db"
    assert cli("index", str(tmp_path / "p"), "--db", str(built), "--model", model).returncode == 0
    db = folder / "c.db"
    shutil.copy(built, db)  # a catalog in WAL mode, with no -wal or -shm file beside it
    make_readonly()
    make_photos(tmp_path / "p", 6)  # two photos the catalog has not seen
    base = ["search", "a photo", "--in", str(tmp_path / "p"), "--db", str(db), "--model", model]
    code, out, err = run(capsys, *base, "--no-index", "-f", "json")
    assert code == 0 and len(json.loads(out)) == 4, err
    code, out, err = run(capsys, *base, "-f", "json")  # would index: says so, then searches
    assert code == 0 and len(json.loads(out)) == 4, err
    assert "read-only" in one_clean_line(err)
    code, _, err = run(capsys, "index", str(tmp_path / "p"), "--db", str(db), "--model", model)
    assert code == 1 and "read-only" in one_clean_line(err) and str(db) in err
    assert sorted(p.name for p in folder.iterdir()) == ["c.db"]


# ------------------------------------------------------------------ two at once


def test_search_during_an_index_searches_what_it_committed(capsys, tmp_path, tiny_model_dir):
    make_photos(tmp_path / "p", 3)
    db = tmp_path / "c.db"
    on = ["--db", str(db), "--model", f"local:{tiny_model_dir}"]
    assert run(capsys, "index", str(tmp_path / "p"), *on)[0] == 0
    make_photos(tmp_path / "p", 8)  # five new photos, for the running index to encode
    with Catalog(db).updating():  # an index run holds the catalog
        code, out, err = run(
            capsys, "search", "a photo", "--in", str(tmp_path / "p"), *on, "-f", "json"
        )
        assert code == 0 and len(json.loads(out)) == 3, err  # not a second indexer
        assert f"pid {os.getpid()}" in one_clean_line(err)
        code, _, err = run(capsys, "index", str(tmp_path / "p"), *on)
        assert code == 1 and "another cliplens index" in one_clean_line(err)
        with pytest.raises(CatalogBusyError), Catalog(db).updating():
            pass
    assert len(Catalog(db).files_under([str(tmp_path / "p")])) == 3  # nothing written meanwhile
    code, out, _ = run(capsys, "index", str(tmp_path / "p"), *on, "-f", "json")
    assert code == 0 and json.loads(out)["new"] == 5  # the lock went with its holder


# ------------------------------------------------------------------ killed runs


def _orphans(db: Path) -> int:
    con = sqlite3.connect(db)
    n = con.execute(
        "SELECT count(*) FROM embeddings WHERE hash NOT IN "
        "(SELECT hash FROM files WHERE hash IS NOT NULL)"
    ).fetchone()[0]
    con.close()
    return n


def test_a_reindex_killed_before_collecting_leaves_no_orphans_for_good(monkeypatch, tmp_path, tiny):
    paths = make_photos(tmp_path / "p", 6)
    db = tmp_path / "c.db"
    update_catalog(Catalog(db), tiny, [tmp_path / "p"], workers=0)
    make_photos(tmp_path / "p", 6, seed=5)  # every photo changes: six embeddings orphaned
    assert len(paths) == 6

    def killed(self):
        raise KeyboardInterrupt  # the run dies after committing, before collecting

    with monkeypatch.context() as m:
        m.setattr(Catalog, "collect_garbage", killed)
        with pytest.raises(KeyboardInterrupt):
            update_catalog(Catalog(db), tiny, [tmp_path / "p"], workers=0)
    assert _orphans(db) == 6
    stats = update_catalog(Catalog(db), tiny, [tmp_path / "p"], workers=0)  # nothing to do...
    assert stats.unchanged == 6 and stats.encoded == 0
    assert _orphans(db) == 0  # ...but the garbage the killed run left is collected


def test_killed_indexer_takes_its_decoder_workers_with_it(tmp_path, tiny_model_dir):
    make_photos(tmp_path / "p", 400, size=(640, 480))
    db = tmp_path / "c.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cliplens.cli.main",
            "index",
            str(tmp_path / "p"),
            "--db",
            str(db),
            "--workers",
            "2",
            "--model",
            f"local:{tiny_model_dir}",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    children: list = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(children) < 2:
        children = parent.children()
        time.sleep(0.05)
    assert len(children) >= 2, "the decoder pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"decoder workers outlived the indexer: {[p.pid for p in alive]}"


def test_catalog_error_for_a_folder_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CatalogError, match="a part of its folder is a file"):
        Catalog(blocker / "sub" / "c.db")


def test_links_give_way_to_real_names_and_lose_nothing(tmp_path, photos):
    from cliplens.images import iter_image_files

    folder = tmp_path / "p"
    (folder / "real").mkdir(parents=True)
    shutil.copy(photos / "cat.jpg", folder / "real" / "z-cat.jpg")
    (folder / "a-cat.jpg").symlink_to(folder / "real" / "z-cat.jpg")  # sorts first
    (folder / "a-dir").symlink_to(folder / "real", target_is_directory=True)
    outside = tmp_path / "outside.jpg"
    shutil.copy(photos / "rocket.jpg", outside)
    (folder / "b-out.jpg").symlink_to(outside)  # its target is found nowhere else
    # git-annex's layout: the link is the only name (hidden folder, no extension)
    annexed = folder / ".git" / "annex" / "objects" / "SHA256E-s1--x"
    annexed.parent.mkdir(parents=True)
    shutil.copy(photos / "coffee.jpg", annexed)
    (folder / "c-annex.jpg").symlink_to(annexed)
    (folder / ".hidden").mkdir()
    shutil.copy(photos / "coffee.jpg", folder / ".hidden" / "h.jpg")
    (folder / "d-hidden").symlink_to(folder / ".hidden", target_is_directory=True)
    found = [str(p.relative_to(folder)) for p in iter_image_files([folder])]
    assert found == ["b-out.jpg", "c-annex.jpg", "d-hidden/h.jpg", "real/z-cat.jpg"]


def test_embed_dataset_keeps_names_that_are_not_utf8(odd_folder):
    from cliplens.distributed.embed import _decode_one, list_hash, list_images
    from cliplens.paths import from_text
    from cliplens.preprocess import Preprocessing

    files = list_images([str(odd_folder)])
    assert len(list_hash(files)) == 64  # the listing hashes: every entry is valid text
    odd = [f for f in files if from_text(f) == str(odd_folder / ODD)]
    assert len(odd) == 1 and odd[0] != str(odd_folder / ODD)
    prep = Preprocessing(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    size, _, crop, error = _decode_one(odd[0], prep, None)
    assert error == "" and crop is not None and size == (odd_folder / ODD).stat().st_size


def test_a_fifo_named_like_a_photo_is_a_failure_not_a_hang(tmp_path, tiny_model_dir):
    """Given by name, a FIFO (or any file that is not a regular one) is reported failed at
    once: reading it to hash its bytes would wait for a writer for ever."""
    make_photos(tmp_path / "p", 2)
    os.mkfifo(tmp_path / "p" / "pipe.jpg")
    db = tmp_path / "c.db"
    named = [str(tmp_path / "p" / n) for n in ("img000.jpg", "pipe.jpg", "img001.jpg")]
    env = {"CLIPLENS_MODEL": f"local:{tiny_model_dir}"}
    done = cli("index", *named, "--db", str(db), "-f", "json", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["new"] == 2 and stats["failed"] == 1
    assert "pipe.jpg: not a regular file" in done.stderr.decode()
