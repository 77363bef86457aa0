"""Settings file and user folders: isolated per test, atomic, tolerant of a damaged file."""

import json

import pytest

from digital_stain._napari import settings


def test_folders_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITAL_STAIN_CONFIG_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("DIGITAL_STAIN_DATA_DIR", str(tmp_path / "d"))
    assert settings.config_dir() == tmp_path / "c"
    assert settings.models_dir() == tmp_path / "d" / "models"
    monkeypatch.delenv("DIGITAL_STAIN_CONFIG_DIR")
    assert "napari-digital-stain" in str(settings.config_dir())  # the platform's own folder


def test_sections_are_saved_and_kept_apart():
    assert settings.load_settings("stain") == {}
    settings.save_settings("stain", {"tile": 768, "device": "cpu"})
    settings.save_settings("finetune", {"steps": 10})
    assert settings.load_settings("stain") == {"tile": 768, "device": "cpu"}
    assert settings.load_settings("finetune") == {"steps": 10}
    written = json.loads((settings.config_dir() / settings.SETTINGS_FILE).read_text())
    assert set(written) == {"stain", "finetune"}
    assert not [p for p in settings.config_dir().iterdir() if p.name != settings.SETTINGS_FILE]  # no leftovers


def test_a_damaged_file_is_ignored_with_a_warning_and_replaced():
    settings.config_dir().mkdir(parents=True)
    (settings.config_dir() / settings.SETTINGS_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring unreadable settings file"):
        assert settings.load_settings("stain") == {}
    settings.save_settings("stain", {"tile": 512})
    assert settings.load_settings("stain") == {"tile": 512}


def test_user_models_are_listed_newest_first(tmp_path):
    import os

    assert settings.user_models() == []
    folder = settings.models_dir()
    folder.mkdir(parents=True)
    for i, name in enumerate(["old", "new"]):
        path = folder / f"{name}.safetensors"
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    (folder / "notes.txt").write_text("")
    assert [p.stem for p in settings.user_models()] == ["new", "old"]
