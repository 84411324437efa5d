"""Deployment steps that Prefect runs on the worker's host when a flow run starts."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_VARIABLE = "RESUMABLE_PROJECT_DIR"


def enter_project_folder() -> dict[str, str]:
    """Pull step: run from this host's copy of the project.

    The folder is read from `RESUMABLE_PROJECT_DIR` when the run starts, on the host that
    runs it, so every worker host can keep its copy where it likes. (A `{{ $VARIABLE }}` in
    `prefect.yaml` would be filled in once, by `prefect deploy`, on the deploying machine.)
    Without the variable, the folder this package was installed from is used.
    """
    directory = Path(os.environ.get(PROJECT_VARIABLE) or Path(__file__).parents[1])
    if not (directory / "flows").is_dir():
        raise FileNotFoundError(
            f"{directory} holds no `flows/` folder: set {PROJECT_VARIABLE} to this host's copy of the project"
        )
    os.chdir(directory)
    return {"directory": str(directory.resolve())}
