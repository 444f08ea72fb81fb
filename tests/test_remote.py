"""Checkpoints at URLs, read by range requests from servers the tests start on loopback."""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, run

import paramctl
from paramctl import remote

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


class Handler(BaseHTTPRequestHandler):
    """Files under the server's `root`; `/moved/X` answers 302 to `/X`, `/secret/X` 403, and
    the server honours Range unless `ranges` is off. Every request is logged."""

    protocol_version = "HTTP/1.1"  # connections kept alive between requests, as real servers do

    def log_message(self, *args):
        pass

    def _send_file(self, head: bool) -> None:
        server = self.server
        server.log.append((self.command, self.path, self.headers.get("Range")))
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/moved") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/secret/"):
            self.send_error(403)
            return
        path = server.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match and server.ranges:
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self):
        self._send_file(head=False)

    def do_HEAD(self):
        self._send_file(head=True)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-answer (paramctl refusing a non-range reply) is no news


@pytest.fixture
def http(tmp_path):
    servers = []

    def start(ranges: bool = True):
        server = Server(("127.0.0.1", 0), Handler)
        server.root, server.ranges, server.log = tmp_path, ranges, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    remote._files.clear()


def write_shards(directory: Path) -> None:
    result = run(
        "convert", str(SAMPLES / "mlp.pt"), str(directory / "model.safetensors.index.json"), "--shard-size", "12KB"
    )
    assert result.exit_code == 0, result.stderr


def local_rows(path: Path, *args: str) -> list[dict]:
    return json.loads(run("ls", str(path), *args, "-f", "json").stdout)


def test_ls_of_a_sharded_set_reads_the_index_then_each_shard_header(http, tmp_path):
    write_shards(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    server, base = http()
    url = f"{base}/model.safetensors.index.json"
    result = run("ls", url, "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == local_rows(tmp_path / "model.safetensors.index.json")
    for shard in shards:  # a size lookup and one range: the header lies in the first MiB
        assert len([r for r in server.log if r[1] == f"/{shard}"]) <= 2
    assert all(r[2] is None or r[2].startswith("bytes=0-") for r in server.log)  # headers only


def test_stats_check_and_convert_stream_the_values(http, tmp_path):
    (tmp_path / "mlp.safetensors").write_bytes((SAMPLES / "mlp.safetensors").read_bytes())
    _, base = http()
    url = f"{base}/mlp.safetensors"
    remote_stats = json.loads(run("stats", url, "-f", "json").stdout)
    assert remote_stats == json.loads(run("stats", str(tmp_path / "mlp.safetensors"), "-f", "json").stdout)
    assert run("check", url).exit_code == 0
    out = tmp_path / "copy.pt"
    assert run("convert", url, str(out)).exit_code == 0
    import torch

    loaded = torch.load(out)
    for t in paramctl.load(str(SAMPLES / "mlp.safetensors")):
        np.testing.assert_array_equal(loaded[t.name].numpy(), t.array())
    diff = run("diff", url, str(SAMPLES / "mlp.pt"))
    assert diff.exit_code == 0, diff.stdout


def test_zip_pt_over_http_and_through_a_redirect(http, tmp_path):
    (tmp_path / "nested.pt").write_bytes((SAMPLES / "nested.pt").read_bytes())
    server, base = http()
    expected = local_rows(SAMPLES / "nested.pt")
    assert json.loads(run("ls", f"{base}/nested.pt", "-f", "json").stdout) == expected
    remote._files.clear()
    moved = run("ls", f"{base}/moved/nested.pt", "-f", "json")
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(moved.stdout) == expected
    assert any(r[1] == "/moved/nested.pt" for r in server.log)


@pytest.mark.parametrize(
    ("path", "message"),
    [("/missing.safetensors", "not found (404)"), ("/secret/mlp.safetensors", "access denied (403)")],
)
def test_http_errors_are_one_line_naming_the_url(http, tmp_path, path, message):
    (tmp_path / "mlp.safetensors").write_bytes((SAMPLES / "mlp.safetensors").read_bytes())
    _, base = http()
    result = run("ls", base + path + "?token=SECRET")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert message in result.stderr and base + path in result.stderr
    assert "SECRET" not in result.stderr


def test_a_server_without_range_support_is_a_clean_error(http, tmp_path):
    from safetensors.numpy import save_file

    # past the first block of remote.READ_AHEAD (a smaller file is read whole, from its start)
    save_file(
        {"w": np.ones(remote.READ_AHEAD // 2, np.float32), "v": np.ones(10, np.float32)}, tmp_path / "big.safetensors"
    )
    _, base = http(ranges=False)
    result = run("stats", f"{base}/big.safetensors")
    assert result.exit_code == 2
    assert "does not support range requests" in result.stderr and result.stderr.count("\n") == 1


def test_formats_not_read_over_urls_are_refused_clearly(http, tmp_path):
    (tmp_path / "mlp.h5").write_bytes((SAMPLES / "mlp.h5").read_bytes())
    _, base = http()
    result = run("ls", f"{base}/mlp.h5")
    assert result.exit_code == 2 and "download it first" in result.stderr


def test_credentials_in_a_url_are_never_printed():
    assert remote.redact("https://user:pw@host:8080/a/b.safetensors?X-Amz-Signature=abc") == (
        "https://host:8080/a/b.safetensors"
    )


def test_cache_dir_serves_repeat_reads(http, tmp_path, monkeypatch):
    (tmp_path / "mlp.safetensors").write_bytes((SAMPLES / "mlp.safetensors").read_bytes())
    server, base = http()
    cache = tmp_path / "cache"
    monkeypatch.setattr(remote, "cache_dir", str(cache))
    first = run("stats", f"{base}/mlp.safetensors", "-f", "json")
    assert first.exit_code == 0, first.stderr
    ranged = len([r for r in server.log if r[2]])
    remote._files.clear()
    again = run("stats", f"{base}/mlp.safetensors", "-f", "json")
    assert again.stdout == first.stdout
    assert len([r for r in server.log if r[2]]) == ranged  # every block came from the cache
    assert any(cache.iterdir())


@pytest.fixture
def s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="models")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield client
    remote._files.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_sharded_set_and_single_file(s3, tmp_path):
    write_shards(tmp_path)
    for path in tmp_path.iterdir():
        s3.upload_file(str(path), "models", f"gpt/{path.name}")
    s3.upload_file(str(SAMPLES / "mlp.pt"), "models", "mlp.pt")
    result = run("ls", "s3://models/gpt/model.safetensors.index.json", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == local_rows(tmp_path / "model.safetensors.index.json")
    stats = run("stats", "s3://models/mlp.pt", "-f", "json")
    assert stats.exit_code == 0, stats.stderr
    assert json.loads(stats.stdout) == json.loads(run("stats", str(SAMPLES / "mlp.pt"), "-f", "json").stdout)
    missing = run("ls", "s3://models/nothing.safetensors")
    assert missing.exit_code == 2 and "not found" in missing.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in missing.stderr


def test_credentials_never_reach_stdout_or_stderr(http, tmp_path):
    write_shards(tmp_path)
    (tmp_path / "mlp.pt").write_bytes((SAMPLES / "mlp.pt").read_bytes())
    _, base = http()
    secret = base.replace("http://", "http://user:s3cr3t@")
    for args in (
        ("info", f"{secret}/mlp.pt?X-Amz-Signature=abc", "-f", "json"),
        ("info", f"{secret}/model.safetensors.index.json?sig=1", "-f", "table"),
        ("check", f"{secret}/mlp.pt?sig=1"),
        ("stats", f"{secret}/mlp.pt?sig=1", "-f", "table"),
        ("ls", f"{secret}/missing.pt?sig=1"),
    ):
        result = run(*args)
        assert result.exit_code in (0, 2), (args, result.stderr)
        for text in (result.stdout, result.stderr):
            assert "s3cr3t" not in text and "sig" not in text.lower(), (args, text)
    info = json.loads(run("info", f"{base}/model.safetensors.index.json", "-f", "json").stdout)
    assert info["file_size"] == sum(p.stat().st_size for p in tmp_path.glob("model*"))


def test_gguf_over_http_reads_the_header_by_ranges(http, tmp_path):
    from test_gguf import write_gguf

    gguf_path = write_gguf(tmp_path / "tiny.gguf")
    server, base = http()
    url = f"{base}/tiny.gguf"
    local = json.loads(run("ls", str(gguf_path), "-f", "json").stdout)
    assert json.loads(run("ls", url, "-f", "json").stdout) == local
    info = json.loads(run("info", url, "-f", "json").stdout)
    assert info["entries"]["general.architecture"] == "llama"
    stats = run("stats", url, "-f", "json")
    assert stats.exit_code == 0, stats.stderr
    assert json.loads(stats.stdout) == json.loads(run("stats", str(gguf_path), "-f", "json").stdout)


def test_an_edit_of_a_remote_sharded_set_writes_a_whole_local_directory(http, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_shards(served)
    (served / "config.json").write_text('{"model_type": "mlp"}')
    _, base = http()
    out = tmp_path / "out"
    result = run("set", f"{base}/served/model.safetensors.index.json", "2.bias", "0", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert "copied config.json" in result.stderr
    assert (out / "config.json").read_text() == '{"model_type": "mlp"}'
    edited = paramctl.load(str(out))
    original = paramctl.load(str(served))
    assert edited.names() == original.names()
    for t in original:  # unchanged shards came over by ranges, byte for byte
        expected = np.zeros(10, np.float32) if t.name == "2.bias" else t.array()
        np.testing.assert_array_equal(edited[t.name].array(), expected)
