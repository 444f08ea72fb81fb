"""QA: URLs in errors never show their credentials, and an output URL is refused rather than
written as a local directory named `http:`."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import SAMPLES, run

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from test_remote import Handler, Server  # noqa: E402

from paramctl import remote  # noqa: E402


@pytest.fixture
def served(tmp_path):
    (tmp_path / "mlp.pt").write_bytes((SAMPLES / "mlp.pt").read_bytes())
    data = (SAMPLES / "mlp.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])  # truncated: refused by the reader
    (tmp_path / "x.params").write_bytes((0x112).to_bytes(8, "little") + bytes(8) + bytes(8) + bytes(8))
    server = Server(("127.0.0.1", 0), Handler)
    server.root, server.ranges, server.log = tmp_path, True, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://user:s3cr3t@127.0.0.1:{server.server_port}", f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    remote._files.clear()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("cut.safetensors", "data buffer is"),  # a reader's own error
        ("x.params", "is not read over a URL"),  # the registry's refusal
        ("missing.pt", "not found (404)"),  # the remote layer's
    ],
)
def test_errors_name_the_url_without_credentials(served, name, error):
    base, host = served
    result = run("ls", f"{base}/{name}?X-Amz-Signature=abcdef")
    assert result.exit_code == 2
    assert result.output == f"paramctl: error: http://{host}/{name}: " + result.output.split(f"/{name}: ", 1)[1]
    assert error in result.output
    assert "s3cr3t" not in result.output and "abcdef" not in result.output


REFUSED = "paramctl writes local files only: write it here, then upload it"


def test_an_output_url_is_refused_and_nothing_is_made(served, tmp_path, monkeypatch):
    base, host = served
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = run("convert", str(SAMPLES / "mlp.pt"), f"{base}/out.pt?sig=1")
    assert result.exit_code == 2
    assert result.output == f"paramctl: error: http://{host}/out.pt: {REFUSED}\n"
    result = run("reinit", f"{base}/mlp.pt", "--init", "zeros", "--in-place", "--seed", "1")
    assert result.exit_code == 2
    last = result.output.splitlines()[-1]  # (reinit's plan, on stderr before it, is reinit's own)
    assert last == f"paramctl: error: http://{host}/mlp.pt: {REFUSED}"
    assert sorted(os.listdir(tmp_path)) == before  # no `http:` directory
