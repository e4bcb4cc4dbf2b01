"""The shared CLI skeleton checks output paths before any work starts, and shows each CLI's whole
first docstring paragraph as its --help description."""
import argparse

import pytest

from impl.common import cli


def test_output_path_under_a_file_or_unwritable_folder_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    for path, named in ((tmp_path / "afile" / "r.json", "is a file, not a folder"),
                        (tmp_path / "afile" / "deeper" / "r.json", "is a file, not a folder"),
                        ("/proc/r.json", "is not writable"), (tmp_path, "is a directory"), ("  ", "empty")):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            cli.output_path(str(path))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        cli.output_dir(str(tmp_path / "afile"))
    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        cli.output_dir("/proc/sub")


def test_output_paths_in_missing_folders_are_accepted_and_nothing_is_left(tmp_path):
    assert cli.output_path(str(tmp_path / "new" / "sub" / "r.json"))
    assert cli.output_dir(str(tmp_path / "new2"))
    assert cli.output_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_description_is_the_whole_first_paragraph():
    doc = """First line of the paragraph
    goes on here.

    Second paragraph."""
    assert cli.parser("prog", doc).description == "First line of the paragraph goes on here."
