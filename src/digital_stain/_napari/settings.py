"""Where the plugin remembers things: its settings file and the user's fine-tuned models.

Settings are a small JSON file (not a pickle, readable by people) in the
user's config folder; fine-tuned models go to the user's data folder. Both
follow the platform's conventions (``platformdirs``) and can be moved with
the environment variables ``DIGITAL_STAIN_CONFIG_DIR`` and
``DIGITAL_STAIN_DATA_DIR`` (tests point them at temporary folders).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

APP = "napari-digital-stain"
SETTINGS_FILE = "settings.json"


def config_dir() -> Path:
    """The folder holding ``settings.json`` (not created here)."""
    override = os.environ.get("DIGITAL_STAIN_CONFIG_DIR")
    if override:
        return Path(override)
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP, appauthor=False))


def data_dir() -> Path:
    """The user's data folder for this plugin (not created here)."""
    override = os.environ.get("DIGITAL_STAIN_DATA_DIR")
    if override:
        return Path(override)
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP, appauthor=False))


def models_dir() -> Path:
    """Where fine-tuned models are written by default."""
    return data_dir() / "models"


def user_models() -> list[Path]:
    """Model files in :func:`models_dir`, newest first."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)


def load_settings(section: str) -> dict:
    """One section of the settings file; ``{}`` when there is none.

    A damaged file is not fatal: it is reported as a warning and ignored
    (the next save replaces it), so a bad file never stops the widgets opening.
    """
    path = config_dir() / SETTINGS_FILE
    if not path.exists():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable settings file {path} ({err}); it is replaced on the next save.",
                      stacklevel=2)
        return {}
    section_values = values.get(section, {})
    return section_values if isinstance(section_values, dict) else {}


def save_settings(section: str, values: dict) -> None:
    """Replace one section of the settings file, atomically (other sections are kept)."""
    from digital_stain.io.images import atomic_path

    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SETTINGS_FILE
    try:
        current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if not isinstance(current, dict):
            current = {}
    except (OSError, ValueError):
        current = {}
    current[section] = values
    with atomic_path(path, overwrite=True, owned=True) as tmp:  # our own settings file
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True), encoding="utf-8")
