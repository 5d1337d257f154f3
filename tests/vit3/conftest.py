import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest


@pytest.fixture
def release_server():
    """An HTTP server on 127.0.0.1 (a free port, its own thread) serving `files[id]` at release-style urls,
    /f/<id>/?dl=1 (an id may hold a file name, "vit3-1a2b3c4d.pth"), as `content_type[id]` or
    application/octet-stream; ids in `truncated` announce their full Content-Length but send half and
    close, ids in `stalled` send half and then nothing for 3 s; unknown ids get 404. `requests` records
    every path asked for. Shut down after the test."""
    server_state = SimpleNamespace(files={}, content_type={}, truncated=set(), stalled=set(), requests=[])

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stalled client cannot hold the server's thread

        def do_GET(self):
            server_state.requests.append(self.path)
            match = re.fullmatch(r"/f/([\w.-]+)/\?dl=1", self.path)
            body = server_state.files.get(match.group(1)) if match else None
            if body is None:
                self.send_error(404)
                return
            file_id = match.group(1)
            self.send_response(200)
            self.send_header("Content-Type", server_state.content_type.get(file_id, "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = file_id in server_state.truncated or file_id in server_state.stalled
            self.wfile.write(body[:len(body) // 2] if cut else body)
            if file_id in server_state.stalled:
                self.wfile.flush()
                time.sleep(3)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server_state.url = lambda file_id: f"http://127.0.0.1:{server.server_port}/f/{file_id}/?dl=1"
    yield server_state
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"
