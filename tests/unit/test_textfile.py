"""The one reader of users' text files: its errors, in the class each caller knows, and the
line reader every list file goes through."""

from __future__ import annotations

import pytest

from cliplens.errors import InvalidInputError
from cliplens.tasks.policy import PolicyError, load_policy
from cliplens.textfile import read_lines, read_text
from cliplens.train.data import DataError, read_pairs

BINARY = bytes(range(256))


def test_read_text_raises_the_class_it_is_given(tmp_path):
    (tmp_path / "bin.txt").write_bytes(BINARY)
    with pytest.raises(InvalidInputError, match=r"labels .*bin\.txt is not UTF-8") as err:
        read_text(tmp_path / "bin.txt", "labels", "one label per line")
    assert type(err.value) is InvalidInputError
    cases = [(tmp_path / "bin.txt", "not UTF-8"), (tmp_path, "is a folder")]
    for path, message in [*cases, (tmp_path / "gone.txt", "no such file")]:
        with pytest.raises(DataError, match=message):
            read_text(path, "training data", "a listing", DataError)
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\r\n".encode())
    assert read_text(tmp_path / "bom.txt", "labels", "labels") == "cat\r\n"


def test_callers_get_their_own_error_class_for_a_binary_file(tmp_path):
    (tmp_path / "p.yaml").write_bytes(BINARY)
    with pytest.raises(PolicyError, match=r"policy .*p\.yaml is not UTF-8"):
        load_policy(tmp_path / "p.yaml")
    (tmp_path / "d.jsonl").write_bytes(BINARY)
    with pytest.raises(DataError, match=r"training data .*d\.jsonl is not UTF-8"):
        read_pairs(tmp_path / "d.jsonl")


def test_read_lines_strips_and_drops_blanks_and_comments_when_asked(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("  cat \n\n# a comment\r\n\tdog\n   \n")
    assert read_lines(path, "labels", "labels") == ["cat", "# a comment", "dog"]
    assert read_lines(path, "labels", "labels", comments=True) == ["cat", "dog"]
    path.write_text("# only a comment\n\n")
    assert read_lines(path, "labels", "labels", comments=True) == []
    with pytest.raises(InvalidInputError, match=r"--refs .*l\.txt: no lines in it"):
        read_lines(path, "--refs", "captions", comments=True, required=True)
