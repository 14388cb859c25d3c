"""Loggers: Lightning's own, instantiated from configs/logger/ (``_target_``); this module adds what wandb lacks.

``WandbLogger`` is Lightning's with two defaults a cluster job needs: ``offline=None`` means offline exactly when no
API key is available (a job without credentials still logs, to ``save_dir``, for a later ``wandb sync``), and tags
that are paths (a local model directory) are cut to their last part (wandb refuses tags over 64 characters).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


def wandb_api_key_available() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc for the wandb host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``; ``offline=None`` picks offline when no API key is set (module docstring)."""

    def __init__(
        self, *, offline: bool | None = None, save_dir: str = ".", tags: list[str] | None = None, **kwargs: Any
    ) -> None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            offline=not wandb_api_key_available() if offline is None else bool(offline),
            save_dir=save_dir,
            tags=[Path(str(tag)).name for tag in tags or []],
            **kwargs,
        )
