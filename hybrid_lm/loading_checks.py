"""Checks run before transformers' loaders, so a bad path or a damaged file fails with its name and the fix.

Without them a missing local folder surfaces as huggingface_hub's "Repo id must be in the form ...", an empty
one as a missing config or backend, and a truncated file as a bare json or safetensors parse error.
Only local folders are checked; a Hub repo id goes to transformers unchanged.
"""

import json
import os
import re

from safetensors import SafetensorError, safe_open

# What huggingface_hub accepts as a repo id; anything else can only be a local path.
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def local_folder(path_or_repo_id: str | os.PathLike, subfolder: str = "") -> str | None:
    """The folder `path_or_repo_id` names on this machine, or None for a Hub repo id.

    Raises `FileNotFoundError` for a path that neither exists nor can be a repo id, and for an empty folder.
    """
    path = os.path.join(os.fspath(path_or_repo_id), subfolder) if subfolder else os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        if not os.listdir(path):
            raise FileNotFoundError(
                f"{path} is an empty folder: nothing to load; point at the folder save_pretrained wrote"
            )
        return path
    if os.path.exists(path) or (not isinstance(path_or_repo_id, os.PathLike) and _REPO_ID.fullmatch(path)):
        return None  # a file (transformers loads a config.json path itself) or a Hub repo id
    raise FileNotFoundError(
        f"{path} does not exist (and is not a Hub repo id); pass a folder written by save_pretrained, or a Hub repo "
        "id such as 'org/model'"
    )


def read_json_file(path: str) -> dict:
    """The JSON object in `path`, or a `ValueError` that names the file."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        size = os.path.getsize(path)
        state = "empty" if size == 0 else f"not valid JSON ({error}; {size} bytes, truncated?)"
        raise ValueError(f"{path} is {state}; save it again or copy it from the original checkpoint") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; restore it")
    return value


def check_weight_files(path_or_repo_id: str | os.PathLike, subfolder: str = "") -> None:
    """Open the header of every local safetensors weight file; raise a `ValueError` naming a damaged one."""
    folder = local_folder(path_or_repo_id, subfolder)
    if folder is None:
        if os.path.isfile(path_or_repo_id):
            raise NotADirectoryError(
                f"{os.fspath(path_or_repo_id)} is a file; pass the folder that holds the checkpoint "
                f"({os.path.dirname(os.path.abspath(path_or_repo_id))})"
            )
        return
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(read_json_file(index).get("weight_map", {}).values()))
    else:
        names = ["model.safetensors"]
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue  # transformers names a missing file (or falls back to pytorch_model.bin) itself
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            state = "empty" if os.path.getsize(path) == 0 else f"truncated or damaged ({error})"
            raise ValueError(f"{path} is {state}; save the model again or re-download the file") from None
