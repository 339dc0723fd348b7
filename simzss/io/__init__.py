"""Models in and out: writing exports, loading exports and trainer checkpoints, importing foreign checkpoints.

:mod:`~simzss.io.export` (``save_pretrained``, ``export_checkpoint``; the command is :mod:`simzss.cli.export`),
:mod:`~simzss.io.official` (the release's checkpoints; the command is :mod:`simzss.cli.import_official`),
:mod:`~simzss.io.checkpoint` (trainer checkpoints as models), :mod:`~simzss.io.load` (``load_model``: whatever a
command is given), :mod:`~simzss.io.card` (model cards), :mod:`~simzss.io.hub` (Hugging Face Hub upload). The folder format itself is
:mod:`simzss.models.pretrained`, so that ``SimZSS.from_pretrained`` needs nothing from this package.
"""

from simzss.io.checkpoint import load_checkpoint, read_checkpoint_config, resolve_checkpoint
from simzss.io.export import export_checkpoint, save_pretrained, write_export
from simzss.io.load import load_model, load_pretrained
from simzss.models.pretrained import FORMAT_VERSION, ExportError, is_export, read_export_config, write_text_config

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "export_checkpoint",
    "is_export",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "read_checkpoint_config",
    "read_export_config",
    "resolve_checkpoint",
    "save_pretrained",
    "write_export",
    "write_text_config",
]
