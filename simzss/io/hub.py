"""Publishing an export to the Hugging Face Hub (``simzss export --push-to-hub``)."""

from __future__ import annotations

import os
from typing import Optional

from simzss import __version__
from simzss.models.pretrained import ExportError, read_export_config


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None) -> str:
    """Upload an export folder to a Hugging Face model repo (created if needed); returns the commit URL.

    Any hub or network failure becomes an :class:`ExportError` with the reason.
    """
    read_export_config(folder)  # never upload a partial or foreign folder
    try:
        import huggingface_hub
    except ImportError:
        raise ExportError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        info = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            token=token,
            commit_message=f"Upload SimZSS export (simzss {__version__})",
        )
    except Exception as e:  # network, auth, offline mode, bad repo id: all reported, none a traceback
        raise ExportError(f"push to the Hugging Face Hub ({repo_id}) failed: {type(e).__name__}: {e}") from None
    return str(getattr(info, "commit_url", info))
