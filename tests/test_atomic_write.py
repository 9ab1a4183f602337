"""dnnlib.util's atomic writers: a file or folder is either its old self or the whole new one, never torn, and no
temporary output is left behind by a failed write (a killed process leaves only its `.tmp-<pid>` name)."""

import os
import subprocess
import sys

import pytest

from dnnlib.util import AtomicWriter, atomic_folder, atomic_write
from tests.helpers import REPO


def test_atomic_write_replaces_the_file_when_the_block_ends(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(str(path)) as f:
        f.write(b"new content")
        assert path.read_bytes() == b"old"  # nothing under the final name until the block ends
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["out.bin"]
    with atomic_write(str(tmp_path / "text.json"), "w") as f:
        f.write("{}\n")
    assert (tmp_path / "text.json").read_text() == "{}\n"


def test_an_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="midway"):
        with atomic_write(str(path)) as f:
            f.write(b"half of the new")
            raise ValueError("midway")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):  # not only Exceptions: an interrupt cleans up too
        with atomic_write(str(tmp_path / "fresh.bin")) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    """The process dies mid-write (os._exit runs no finally and no cleanup): the final name keeps its old content; only
    the writer's own temporary name is left, which training/snapshot.py's remove_stale_temp_files clears for
    snapshots."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    code = ("import os, sys\nfrom dnnlib.util import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n    f.write(b'half of the new')\n    f.flush()\n    os._exit(3)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO)
    assert writer.wait(timeout=60) == 3
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", f"out.bin.tmp-{writer.pid}"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "records"
    with atomic_folder(str(dest)) as staging:
        (tmp_path / os.path.basename(staging) / "a.txt").write_text("a")
        assert not dest.exists()
    assert os.listdir(dest) == ["a.txt"]
    with pytest.raises(ValueError):
        with atomic_folder(str(tmp_path / "other")) as staging:
            open(os.path.join(staging, "b.txt"), "w").close()
            raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["records"]


class _LinesWriter(AtomicWriter):
    def __init__(self, path):
        super().__init__()
        self.f = self.stage(atomic_write(path, "w"))

    def finish(self):
        self.commit()


def test_a_piecewise_writer_commits_only_on_finish(tmp_path):
    path = str(tmp_path / "lines.txt")
    with _LinesWriter(path) as writer:
        writer.f.write("one\n")
        writer.finish()
    assert open(path).read() == "one\n"
    with pytest.raises(RuntimeError, match="without finish"):  # a writer left unfinished discards its output
        with _LinesWriter(str(tmp_path / "unfinished.txt")) as writer:
            writer.f.write("two\n")
    assert os.listdir(tmp_path) == ["lines.txt"]
