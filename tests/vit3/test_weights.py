"""The release download (vit3.weights.download_cached, create_pretrained) and the messages of the weights readers.

A file enters the torch hub cache only when it is whole, matches the hash its name gives and reads as weights;
a cached file damaged later is named, downloaded again once, and then named with the way out. No message
relays torch's advice to load with weights_only=False. Files come from an HTTP server on 127.0.0.1
(tests/vit3/conftest.py).
"""
import hashlib
import re

import pytest
import timm
import torch

import vit3.weights
from tests.vit3.test_timm_contract import SHALLOW, small_official_file
from vit3.errors import ConfigError, load_error_text
from vit3.weights import cached_file_name, load_weights

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"


def advises_unsafe_load(message: str) -> bool:
    return re.search(r"weights_only\W{0,3}(=|set to)\W{0,3}False", message) is not None


def create(url: str) -> torch.nn.Module:
    return timm.create_model("vit3_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=url), **SHALLOW["vit3_tiny"])


def same_weights(model, expected) -> bool:
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_an_html_page_sent_with_200_never_enters_the_cache(torch_home, release_server):
    release_server.files["login"] = HTML
    release_server.content_type["login"] = "text/html; charset=utf-8"
    url = release_server.url("login")
    for _ in range(2):  # the second call asks again: nothing was cached
        with pytest.raises(RuntimeError) as error:
            create(url)
        message = str(error.value)
        assert url in message and "sent an HTML page" in message and "nothing was cached" in message
        assert "<!DOCTYPE html>" in message and not advises_unsafe_load(message)
        assert not torch_home.exists() or list(torch_home.iterdir()) == []
    assert len(release_server.requests) == 2


@pytest.mark.parametrize("damage", ["cut", "zeroed"])
def test_a_cached_file_damaged_later_is_named_and_downloaded_again(damage, tmp_path, torch_home, release_server):
    expected = small_official_file("vit3_tiny", tmp_path / "release.pth")
    body = release_server.files["a1b2c3"] = (tmp_path / "release.pth").read_bytes()
    url = release_server.url("a1b2c3")
    create(url)
    cached = torch_home / cached_file_name(url, "vit3_tiny.official_in1k")
    # zeroed: the start of the pickled dict (torch's zip aligns data.pkl to 64 bytes); zeros inside a tensor's
    # bytes would read as other weights, as torch's zip reader checks no CRC
    damaged = body[:len(body) // 2] if damage == "cut" else body[:64] + bytes(64) + body[128:]
    cached.write_bytes(damaged)
    with pytest.warns(UserWarning, match=f"the cached weights {re.escape(str(cached))} cannot be read") as warned:
        model = create(url)
    assert not advises_unsafe_load(str(warned[0].message))
    assert same_weights(model, expected) and cached.read_bytes() == body
    assert len(release_server.requests) == 2


def test_a_file_still_unreadable_after_downloading_it_again_is_named_for_deletion(torch_home, release_server,
                                                                                 monkeypatch):
    """Should a bad file pass the download's checks, the second failure to read it names it, to be deleted."""
    monkeypatch.setattr(vit3.weights, "_check_download", lambda *args: None)
    release_server.files["login"] = HTML
    url = release_server.url("login")
    cached = torch_home / cached_file_name(url, "vit3_tiny.official_in1k")
    with pytest.warns(UserWarning, match="cannot be read"), pytest.raises(RuntimeError) as error:
        create(url)
    message = str(error.value)
    assert f"delete {cached}" in message and url in message and not advises_unsafe_load(message)
    assert len(release_server.requests) == 2


def test_the_hash_in_a_file_name_is_checked(tmp_path, torch_home, release_server):
    """torch.hub's naming, name-<first hex digits of the sha256>.pth: a file that does not match is refused."""
    expected = small_official_file("vit3_tiny", tmp_path / "release.pth")
    body = (tmp_path / "release.pth").read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    wrong = f"vit3-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.pth"
    release_server.files[wrong] = release_server.files[f"vit3-{digest[:8]}.pth"] = body
    with pytest.raises(RuntimeError, match=f"sha256 is {digest}, but its name gives {wrong[5:13]}"):
        create(release_server.url(wrong))
    assert not torch_home.exists() or list(torch_home.iterdir()) == []
    assert same_weights(create(release_server.url(f"vit3-{digest[:8]}.pth")), expected)


def test_a_stalled_download_gives_up_and_leaves_nothing(tmp_path, torch_home, release_server, monkeypatch):
    monkeypatch.setattr(vit3.weights, "STALL_TIMEOUT_S", 1)
    small_official_file("vit3_tiny", tmp_path / "release.pth")
    release_server.files["slow"] = (tmp_path / "release.pth").read_bytes()
    release_server.stalled.add("slow")
    with pytest.raises(RuntimeError, match="cannot download .*timed out"):
        create(release_server.url("slow"))
    assert list(torch_home.iterdir()) == []  # neither the final name nor the partial one


def test_load_error_text_keeps_the_reason_and_drops_the_unsafe_advice(tmp_path):
    html = tmp_path / "page.pth"
    html.write_bytes(HTML)
    with pytest.raises(Exception) as error:
        torch.load(html, weights_only=True)
    assert advises_unsafe_load(str(error.value))  # torch's own message does
    assert load_error_text(error.value) == "UnpicklingError: Unsupported operand 60"
    with pytest.raises(ConfigError) as error:
        load_weights(torch.nn.Linear(2, 2), html)
    assert str(html) in str(error.value) and "Unsupported operand 60" in str(error.value)
    assert not advises_unsafe_load(str(error.value))
