"""Downloads of dataset files, without the internet: a local HTTP server on 127.0.0.1 (or a
fake opener) stands in for the mirrors.

A failed download (HTTP 404, connection refused, a corrupt or cut-short file, Ctrl-C) leaves
no file and no new empty folder; a successful one puts verified files in the user cache that
load; the missing-files message names the folders, the URLs and the user-facing options; the
demo downloads MNIST when it can and falls back to the scikit-learn digits when it cannot.
"""
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pathlib
import socket
import threading
import urllib.error

import numpy as np
import pytest

from capsnet_ext.data import DATA_ENV, CorruptDataError, DataNotFoundError, build_datasets
from capsnet_ext.data import files as data_files
from capsnet_ext.data import mnist as mnist_module

SHARED = os.environ.get(DATA_ENV)
SHARED_MNIST = pathlib.Path(SHARED or "/nonexistent") / "mnist"
NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
COUNTS = {"train": 12, "test": 5}


# --------------------------------------------------------------------------------------------
# helpers: an isolated cache, tiny MNIST-shaped files, a local server

@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A user cache under tmp_path that does not exist yet, and no $CAPSNET_DATA."""
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.delenv(DATA_ENV, raising=False)
    mnist_module.clear_cache()
    yield xdg
    mnist_module.clear_cache()


def _idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def _tiny_mnist_files() -> dict:
    rng = np.random.default_rng(0)
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n = COUNTS[split]
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx_gz(rng.integers(0, 256, (n, 28, 28)))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx_gz(np.arange(n) % 10)
    return files


@pytest.fixture
def tiny_mnist(monkeypatch):
    """MNIST's spec with tiny synthetic files (and their MD5s) in place of the real ones."""
    files = _tiny_mnist_files()
    spec = dataclasses.replace(
        mnist_module.MNIST, num_examples=dict(COUNTS),
        md5={name: hashlib.md5(data).hexdigest() for name, data in files.items()})
    monkeypatch.setitem(mnist_module.SPECS, "mnist", spec)
    monkeypatch.setattr(mnist_module, "MNIST", spec)
    return spec, files


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``self.server.files`` (name -> bytes); unknown names get 404. With
    ``self.server.cut_short`` it announces more bytes than it sends, then hangs up."""

    def do_GET(self):   # noqa: N802 (the http.server API)
        name = self.path.rsplit("/", 1)[-1]
        self.server.requests.append(name)
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        announced = len(data) + (1000 if self.server.cut_short else 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):   # keep test output clean
        pass


@pytest.fixture
def serve():
    """``serve(files, cut_short=False)`` -> base URL of a local HTTP server for ``files``."""
    servers = []

    def start(files, cut_short=False):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.files, server.cut_short, server.requests = dict(files), cut_short, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/mnist/", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def _no_network(monkeypatch) -> list:
    """Make every download fail at once, recording the URLs asked for."""
    asked = []

    def refuse(url, timeout=None):
        asked.append(url)
        raise urllib.error.URLError("network disabled in this test")
    monkeypatch.setattr(data_files, "_urlopen", refuse)
    return asked


def _cached_mnist(xdg: pathlib.Path, files: dict) -> pathlib.Path:
    """``files`` written into the user cache's mnist folder under ``xdg``; that folder."""
    cache = xdg / "capsnet_ext" / "data" / "mnist"
    cache.mkdir(parents=True)
    for name, data in files.items():
        (cache / name).write_bytes(data)
    return cache


def _everything_under(folder: pathlib.Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# failed downloads leave nothing behind

@pytest.mark.parametrize("failure", ["http-404", "connection-refused", "corrupt-md5",
                                     "corrupt-idx-no-md5", "cut-short"])
def test_failed_download_leaves_no_file_and_no_new_folder(failure, isolated, tiny_mnist, serve,
                                                          monkeypatch, tmp_path):
    spec, files = tiny_mnist
    if failure == "http-404":
        url, _ = serve({})
        reason = "HTTP 404"
    elif failure == "connection-refused":
        url = _closed_port_url()
        reason = "refused"
    elif failure == "corrupt-md5":
        url, _ = serve({name: b"not the file" for name in files})
        reason = "MD5"
    elif failure == "corrupt-idx-no-md5":
        # Without a checksum the download is still decoded: a gzip of a bad IDX header fails.
        monkeypatch.setitem(mnist_module.SPECS, "mnist", dataclasses.replace(spec, md5={}))
        url, _ = serve({name: gzip.compress(b"\x01\x02\x03\x04garbage") for name in files})
        reason = "not an IDX file"
    else:
        url, _ = serve(files, cut_short=True)
        reason = "cut short"
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("mnist", mirrors=[url])
    message = str(info.value)
    assert url + "train-images-idx3-ubyte.gz" in message and reason in message
    assert "Nothing was left behind" in message
    assert info.value.attempts and info.value.attempts[0][0] == url + "train-images-idx3-ubyte.gz"
    # Not even the cache folder (or $XDG_CACHE_HOME itself) was left behind.
    assert not isolated.exists(), _everything_under(isolated)


def test_failed_download_keeps_existing_folders_and_their_files(isolated, tiny_mnist, serve):
    folder = isolated / "capsnet_ext" / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    url, _ = serve({})
    with pytest.raises(DataNotFoundError):
        build_datasets("mnist", mirrors=[url])
    assert _everything_under(isolated) == ["capsnet_ext", "capsnet_ext/data",
                                           "capsnet_ext/data/mnist",
                                           "capsnet_ext/data/mnist/notes.txt"]


class _InterruptedResponse(io.BytesIO):
    """A response that delivers a first chunk and then gets Ctrl-C."""

    headers: dict = {}

    def read(self, size=-1):
        if self.tell() == 0:
            return super().read(10)
        raise KeyboardInterrupt


def test_interrupted_download_leaves_nothing(isolated, tiny_mnist, monkeypatch):
    monkeypatch.setattr(data_files, "_urlopen",
                        lambda url, timeout=None: _InterruptedResponse(b"x" * 100))
    with pytest.raises(KeyboardInterrupt):
        build_datasets("mnist")
    assert not isolated.exists(), _everything_under(isolated)


def test_download_function_cleans_up_created_folders_only(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    destination = existing / "a" / "b" / "file.gz"
    with pytest.raises(DataNotFoundError, match="unknown url type"):
        data_files.download(["not-a-url/file.gz"], destination)
    assert _everything_under(tmp_path) == ["existing"]
    # Without an MD5 a .gz download must at least be a complete gzip file.
    source = tmp_path / "src"
    source.mkdir()
    (source / "file.gz").write_bytes(gzip.compress(b"hello")[:-6])
    with pytest.raises(DataNotFoundError, match="not a complete gzip file"):
        data_files.download([(source / "file.gz").as_uri()], destination)
    assert _everything_under(existing) == []
    (source / "file.gz").write_bytes(gzip.compress(b"hello"))
    assert data_files.download([(source / "file.gz").as_uri()], destination) == destination
    assert gzip.decompress(destination.read_bytes()) == b"hello"
    assert _everything_under(existing) == ["a", "a/b", "a/b/file.gz"]


# --------------------------------------------------------------------------------------------
# successful downloads

def test_download_from_local_server_produces_files_that_load(isolated, tiny_mnist, serve):
    spec, files = tiny_mnist
    bad, bad_server = serve({})                 # the first mirror fails: the next one is used
    good, good_server = serve(files)
    bundle = build_datasets("mnist", mirrors=[bad, good])
    assert (len(bundle.train), len(bundle.test)) == (COUNTS["train"], COUNTS["test"])
    assert bundle.test.labels.tolist() == [0, 1, 2, 3, 4]
    cache = isolated / "capsnet_ext" / "data" / "mnist"
    assert _everything_under(cache) == sorted(NAMES)          # no .part file left over
    for name in NAMES:
        assert (cache / name).read_bytes() == files[name]
    assert sorted(good_server.requests) == sorted(NAMES)
    # Now they are found without any download.
    mnist_module.clear_cache()
    again = build_datasets("mnist", download=False)
    assert again.train.labels.tolist() == bundle.train.labels.tolist()


@pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"real MNIST files not found (set ${DATA_ENV})")
def test_real_mnist_download_from_local_server(isolated, serve):
    files = {name: (SHARED_MNIST / name).read_bytes() for name in NAMES[2:]}
    url, _ = serve(files)
    images, labels = mnist_module.load_idx_dataset("mnist", "test", mirrors=[url])
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    cache = isolated / "capsnet_ext" / "data" / "mnist"
    assert _everything_under(cache) == sorted(NAMES[2:])


# --------------------------------------------------------------------------------------------
# messages

def test_missing_files_message_names_folders_urls_and_options(isolated, tmp_path, monkeypatch):
    asked = _no_network(monkeypatch)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("mnist", data_dir=tmp_path / "arg", download=False)
    message = str(info.value)
    assert asked == []
    folders = [tmp_path / "arg" / "mnist", tmp_path / "env" / "mnist",
               isolated / "capsnet_ext" / "data" / "mnist"]
    positions = [message.index(str(folder) + "  ") for folder in folders]
    assert positions == sorted(positions), "folders must be listed in search order"
    for name in NAMES:
        assert name in message
    for mirror in mnist_module.MNIST.mirrors:
        assert mirror + "train-images-idx3-ubyte.gz" in message
    # The options a user has: the commands that download, the demo's flag, the folder options.
    for option in ("capsnet-ext train", "--no-download", "--data-dir", DATA_ENV, "curl"):
        assert option in message
    assert "download=False" not in message
    assert not isolated.exists()


def test_failed_download_message_lists_every_url_and_reason(isolated, monkeypatch):
    asked = _no_network(monkeypatch)
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("mnist")
    message = str(info.value)
    expected = [mirror + "train-images-idx3-ubyte.gz" for mirror in mnist_module.MNIST.mirrors]
    assert asked == expected
    for url in expected:
        assert f"{url}: network disabled in this test" in message
    assert "Nothing was left behind" in message and "curl" in message
    assert not isolated.exists()


def test_found_file_is_not_downloaded_and_corrupt_one_is_not_replaced(isolated, tiny_mnist,
                                                                     monkeypatch):
    spec, files = tiny_mnist
    asked = _no_network(monkeypatch)
    cache = _cached_mnist(isolated, files)
    assert len(build_datasets("mnist").test) == COUNTS["test"] and asked == []
    (cache / NAMES[2]).write_bytes(b"damaged")
    mnist_module.clear_cache()
    with pytest.raises(CorruptDataError, match="MD5"):
        build_datasets("mnist")
    assert asked == [] and (cache / NAMES[2]).read_bytes() == b"damaged"


# --------------------------------------------------------------------------------------------
# the demo

def _demo_args(*extra):
    from capsnet_ext import demo

    return demo.build_parser().parse_args(list(extra))


def test_demo_falls_back_to_digits_when_download_fails(isolated, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from capsnet_ext import demo

    asked = _no_network(monkeypatch)
    bundle, name, description = demo._load_data(_demo_args())
    out = capsys.readouterr().out
    cache = isolated / "capsnet_ext" / "data" / "mnist"
    assert name == "digits" and len(bundle.train) > 0
    # One line said it was downloading, and where to; one line says why the digits stand in.
    downloading = [line for line in out.splitlines() if "downloading" in line]
    assert len(downloading) == 1 and str(cache) in downloading[0]
    assert "\n" not in description
    assert "download failed" in description and "network disabled in this test" in description
    assert "ossci-datasets.s3.amazonaws.com" in description and "nothing partial" in description
    assert str(cache) in description and "--data-dir" in description and DATA_ENV in description
    assert asked and all(url.endswith("train-images-idx3-ubyte.gz") for url in asked)
    assert not isolated.exists(), _everything_under(isolated)


def test_demo_falls_back_when_connection_is_refused(isolated, tiny_mnist, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from capsnet_ext import demo

    spec, _ = tiny_mnist
    refused = dataclasses.replace(spec, mirrors=(_closed_port_url(),))
    monkeypatch.setitem(mnist_module.SPECS, "mnist", refused)
    monkeypatch.setattr(mnist_module, "MNIST", refused)
    _, name, description = demo._load_data(_demo_args())
    assert name == "digits" and "refused" in description
    assert not isolated.exists(), _everything_under(isolated)


def test_demo_downloads_mnist_when_it_can(isolated, tiny_mnist, serve, monkeypatch, capsys):
    from capsnet_ext import demo

    spec, files = tiny_mnist
    url, _ = serve(files)
    served = dataclasses.replace(spec, mirrors=(url,))
    monkeypatch.setitem(mnist_module.SPECS, "mnist", served)
    monkeypatch.setattr(mnist_module, "MNIST", served)
    bundle, name, description = demo._load_data(_demo_args())
    out = capsys.readouterr().out
    cache = isolated / "capsnet_ext" / "data" / "mnist"
    assert name == "mnist" and len(bundle.test) == COUNTS["test"]
    assert "downloading" in out and str(cache) in out and url in out
    assert "downloaded into" in description
    assert _everything_under(cache) == sorted(NAMES)


def test_demo_uses_mnist_it_finds_without_downloading(isolated, tiny_mnist, monkeypatch, capsys):
    from capsnet_ext import demo

    _, files = tiny_mnist
    asked = _no_network(monkeypatch)
    cache = _cached_mnist(isolated, files)
    _, name, description = demo._load_data(_demo_args())
    assert name == "mnist" and asked == []
    assert "downloading" not in capsys.readouterr().out and "downloaded" not in description


def test_demo_no_download_flag_skips_the_download(isolated, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from capsnet_ext import demo

    asked = _no_network(monkeypatch)
    _, name, description = demo._load_data(_demo_args("--no-download"))
    assert name == "digits" and asked == [] and "--no-download" in description
    assert "downloading" not in capsys.readouterr().out
    # Asking for MNIST explicitly without downloading it is an error naming the option.
    with pytest.raises(DataNotFoundError, match="--no-download"):
        demo._load_data(_demo_args("--dataset", "mnist", "--no-download"))
    assert not isolated.exists()


def test_demo_dataset_mnist_is_an_error_when_download_fails(isolated, monkeypatch):
    from capsnet_ext import demo

    _no_network(monkeypatch)
    with pytest.raises(DataNotFoundError, match="Nothing was left behind"):
        demo._load_data(_demo_args("--dataset", "mnist"))
    assert not isolated.exists()


def test_demo_named_folder_without_mnist_is_still_an_error(isolated, tmp_path, monkeypatch):
    from capsnet_ext import demo

    asked = _no_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        demo._load_data(_demo_args("--data-dir", str(tmp_path / "empty")))
    assert asked == [] and not isolated.exists()


def test_demo_runs_offline_end_to_end(isolated, tmp_path, monkeypatch, capsys):
    """The whole demo offline: the download fails at once, the digits train, nothing is cached."""
    pytest.importorskip("sklearn")
    from capsnet_ext import demo

    _no_network(monkeypatch)
    import torch
    threads = torch.get_num_threads()
    try:
        code = demo.main(["--epochs", "1", "--no-figures", "--no-progress", "--threads", "1",
                          "--device", "cpu", "--backend", "reference",
                          "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "downloading it" in out and "data: scikit-learn digits" in out
    assert "download failed" in out
    assert "test accuracy" in out and (tmp_path / "run" / "metrics.json").is_file()
    assert not isolated.exists(), _everything_under(isolated)
