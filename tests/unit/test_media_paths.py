"""The console's media paths: a plain name or FOLDER/NAME one level down, never out of the media folder."""

from __future__ import annotations

import os

import pytest

from appliance.adminops import OpError
from appliance.console import media as M


def test_one_level_of_folders_listed_and_read(tmp_path):
    media = str(tmp_path)
    (tmp_path / "sign-out").mkdir()
    (tmp_path / "sign-out" / "sub.pem").write_bytes(b"cert")
    (tmp_path / "top.pem").write_bytes(b"top")
    (tmp_path / "sign-out" / "deeper").mkdir()
    (tmp_path / "sign-out" / "deeper" / "x.pem").write_bytes(b"no")
    assert M.list_files(media, (".pem",)) == ["top.pem"]
    assert M.list_files(media, (".pem",), subfolders=True) == ["sign-out/sub.pem", "top.pem"]
    assert M.read(media, "sign-out/sub.pem") == b"cert"


@pytest.mark.parametrize("name", ["../etc/passwd", "sign-out/../../x", "a/b/c", "/etc/passwd", "sign-out/", "/x",
                                  "..", "sign-out/..", "link/secret", "nofolder/x.pem", ".hidden/x", "sign-out/.x"])
def test_hostile_names_refused(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    media = tmp_path / "media"
    (media / "sign-out").mkdir(parents=True)
    os.symlink(outside, media / "link")  # an ext4 stick can carry a symbolic link to anywhere
    with pytest.raises(OpError) as e:
        M.read(str(media), name)
    assert "\n" not in str(e.value)


def test_symlinked_folder_never_listed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.pem").write_bytes(b"secret")
    media = tmp_path / "media"
    media.mkdir()
    os.symlink(outside, media / "link")
    assert M.list_files(str(media), (".pem",), subfolders=True) == []
