"""`fetch_cifar10` and `approxdarts-np data fetch` against a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import functools
import hashlib
import io
import socket
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from approxdarts_np.data.cifar import REQUIRED_FILES, default_data_dir, load_cifar10
from approxdarts_np.data.fetch import PUBLISHED_MD5, fetch_cifar10
from approxdarts_np.errors import UserError
from approxdarts_np_cli.main import app

FOLDER = "cifar-10-batches-py"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE,
               linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = linkname
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_archive(path: Path, members: list[tuple[str, bytes]], extra=None, dirs=()) -> str:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name in dirs:
            _add_bytes(tar, name, b"", tarfile.DIRTYPE)
        for name, data in members:
            _add_bytes(tar, name, data)
        if extra is not None:
            extra(tar)
    return _md5(path)


class _Handler(SimpleHTTPRequestHandler):
    """Serves files from a folder, records requested paths, and can cut a transfer short."""

    def __init__(self, *args, requests: list[str], **kwargs):
        self._requests = requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self._requests.append(self.path)
        if self.path == "/truncated.tar.gz":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 1000)
            return
        super().do_GET()

    def log_message(self, format, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local server over a folder with archives built from the bundled sample.

    Yields ``(base_url, folder, requests, md5s)``; ``md5s`` maps archive name to its MD5.
    """
    folder = tmp_path_factory.mktemp("served")
    sample = [(f"{FOLDER}/{name}", (default_data_dir() / name).read_bytes()) for name in REQUIRED_FILES]
    readme = [(f"./{FOLDER}/readme.html", b"<html>CIFAR-10</html>")]
    md5s = {
        "good.tar.gz": _write_archive(folder / "good.tar.gz", sample + readme, dirs=[FOLDER]),
        "incomplete.tar.gz": _write_archive(folder / "incomplete.tar.gz", sample[:3]),
        "dotdot.tar.gz": _write_archive(folder / "dotdot.tar.gz", sample[:1] + [("../escaped", b"x")]),
        "absolute.tar.gz": _write_archive(folder / "absolute.tar.gz", [("/tmp/absolute-member", b"x")]),
        "symlink.tar.gz": _write_archive(
            folder / "symlink.tar.gz", sample[:1],
            extra=lambda tar: _add_bytes(tar, f"{FOLDER}/link", b"", tarfile.SYMTYPE, "/etc/passwd")),
        "hardlink.tar.gz": _write_archive(
            folder / "hardlink.tar.gz", sample[:1],
            extra=lambda tar: _add_bytes(tar, f"{FOLDER}/hard", b"", tarfile.LNKTYPE, "/etc/passwd")),
    }
    (folder / "not-a-tar.tar.gz").write_bytes(b"plain text, not gzip")
    md5s["not-a-tar.tar.gz"] = _md5(folder / "not-a-tar.tar.gz")

    requests: list[str] = []
    handler = functools.partial(_Handler, requests=requests, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder, requests, md5s
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_fetch_downloads_verifies_and_extracts(served, tmp_path):
    base, folder, requests, md5s = served
    calls = []
    dest = tmp_path / "data"
    result = fetch_cifar10(dest, url=f"{base}/good.tar.gz", md5=md5s["good.tar.gz"],
                           progress=lambda *args: calls.append(args))
    size = (folder / "good.tar.gz").stat().st_size
    assert result.downloaded and result.path == dest / FOLDER
    assert result.archive_bytes == size and result.md5 == md5s["good.tar.gz"]
    assert _listing(dest) == sorted([FOLDER] + [f"{FOLDER}/{n}" for n in REQUIRED_FILES + ("readme.html",)])
    for name in REQUIRED_FILES:
        assert (dest / FOLDER / name).read_bytes() == (default_data_dir() / name).read_bytes()
    downloads = [c for c in calls if c[0] == "download"]
    assert downloads[0] == ("download", 0, size) and downloads[-1] == ("download", size, size)
    assert [c for c in calls if c[0] == "extract"][-1] == ("extract", 8, None)
    # The folder fetch creates is one the loader accepts, given either path.
    data = load_cifar10(dest)
    assert data.train_x.shape == (5085, 3, 32, 32)
    assert np.array_equal(data.test_x, load_cifar10().test_x)


def test_complete_folder_is_kept_unless_forced(served, tmp_path):
    base, _, requests, md5s = served
    url = f"{base}/good.tar.gz"
    fetch_cifar10(tmp_path, url=url, md5=md5s["good.tar.gz"])
    marker = tmp_path / FOLDER / "marker"
    marker.write_text("kept")
    before = len(requests)
    result = fetch_cifar10(tmp_path, url=url, md5=md5s["good.tar.gz"])
    assert not result.downloaded and result.path == tmp_path / FOLDER
    assert len(requests) == before and marker.exists()          # no request at all
    result = fetch_cifar10(tmp_path, url=url, md5=md5s["good.tar.gz"], force=True)
    assert result.downloaded and len(requests) == before + 1
    assert not marker.exists()                                  # replaced by the new copy
    assert _listing(tmp_path) == sorted([FOLDER] + [f"{FOLDER}/{n}" for n in REQUIRED_FILES + ("readme.html",)])


def test_incomplete_existing_folder_needs_force(served, tmp_path):
    base, _, _, md5s = served
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "data_batch_1").write_bytes(b"partial")
    with pytest.raises(UserError, match="incomplete"):
        fetch_cifar10(tmp_path, url=f"{base}/good.tar.gz", md5=md5s["good.tar.gz"])
    fetch_cifar10(tmp_path, url=f"{base}/good.tar.gz", md5=md5s["good.tar.gz"], force=True)
    assert load_cifar10(tmp_path).train_x.shape[0] == 5085


@pytest.mark.parametrize("dest_exists", [True, False])
def test_wrong_md5_leaves_nothing_behind(served, tmp_path, dest_exists):
    base, _, requests, md5s = served
    dest = tmp_path / "dest"
    if dest_exists:
        dest.mkdir()
    before = len(requests)
    with pytest.raises(UserError, match="MD5 mismatch") as info:
        fetch_cifar10(dest, url=f"{base}/good.tar.gz", md5="0" * 32)
    assert md5s["good.tar.gz"] in str(info.value)
    assert len(requests) == before + 1
    assert dest.exists() == dest_exists
    assert not dest_exists or _listing(dest) == []


def test_http_404_is_one_clear_error(served, tmp_path):
    base, _, _, _ = served
    with pytest.raises(UserError, match="HTTP 404") as info:
        fetch_cifar10(tmp_path, url=f"{base}/missing.tar.gz")
    assert "\n" not in str(info.value) and f"{base}/missing.tar.gz" in str(info.value)
    assert _listing(tmp_path) == []


def test_refused_connection_and_truncated_transfer(served, tmp_path):
    base, _, _, _ = served
    with socket.socket() as probe:          # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match="download failed"):
        fetch_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/x.tar.gz")
    with pytest.raises(UserError, match="download failed"):
        fetch_cifar10(tmp_path, url=f"{base}/truncated.tar.gz")
    with pytest.raises(UserError, match="unknown url type"):
        fetch_cifar10(tmp_path, url="nope://host/x.tar.gz")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name, message", [
    ("dotdot.tar.gz", "outside the archive"),
    ("absolute.tar.gz", "absolute path"),
    ("symlink.tar.gz", "is a link"),
    ("hardlink.tar.gz", "is a link"),
    ("incomplete.tar.gz", "missing data_batch_4"),
    ("not-a-tar.tar.gz", "not a readable tar.gz"),
])
def test_bad_archives_are_refused_and_cleaned_up(served, tmp_path, name, message):
    base, _, _, md5s = served
    dest = tmp_path / "inner" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(UserError, match=message):
        fetch_cifar10(dest, url=f"{base}/{name}", md5=md5s[name])
    assert _listing(tmp_path) == ["inner", "inner/dest"]
    assert not Path("/tmp/absolute-member").exists()


def test_md5_argument_is_checked(tmp_path):
    with pytest.raises(UserError, match="32 hexadecimal"):
        fetch_cifar10(tmp_path, url="http://127.0.0.1:1/x", md5="xyz")
    assert PUBLISHED_MD5 == "c58f30108f718f92721af3b95e74349a"


def test_cli_fetch_success_then_skip(served, tmp_path):
    base, _, _, md5s = served
    runner = CliRunner()
    args = ["data", "fetch", "--dest", str(tmp_path), "--url", f"{base}/good.tar.gz",
            "--md5", md5s["good.tar.gz"]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"--data-dir {tmp_path / FOLDER}" in result.stdout
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "already present" in result.stdout


@pytest.mark.parametrize("url_name, md5", [("missing.tar.gz", None), ("good.tar.gz", "1" * 32)])
def test_cli_fetch_failure_is_one_line_exit_2(served, tmp_path, url_name, md5):
    base, _, _, _ = served
    args = ["data", "fetch", "--dest", str(tmp_path / "d"), "--url", f"{base}/{url_name}"]
    if md5:
        args += ["--md5", md5]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "d").exists()
