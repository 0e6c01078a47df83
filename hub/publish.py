"""Publish a recipe's output folder as a Hugging Face Hub model repository: the ``robustvit push`` command.

Usage::

    python hub/publish.py OUTPUT_DIR --repo_id org/name [--dry_run DIR] [--private] [--license apache-2.0]
                          [--base_model org/base] [--token TOKEN] [--commit_message MSG]

What a recipe output folder must contain (the contract recipes follow):

* ``OUTPUT_DIR/model/``: the certified model, written by the recipe with
  ``robustvit.save_pretrained(model, OUTPUT_DIR / "model", certificate)``, i.e. ``model.safetensors``,
  ``config.json`` and ``certificate.json``. ``OUTPUT_DIR`` may also be that folder itself.
* optionally ``certified_accuracy.png`` (``CertifyResult.plot``), in ``OUTPUT_DIR/model/`` or in ``OUTPUT_DIR``.

Anything else in ``OUTPUT_DIR`` (logs, checkpoints, metrics) is not published. The model is loaded with
``robustvit.from_pretrained(..., verify=True)``, so an uncertified, tampered or pickle-only folder is refused, then
written again with a model card for ``--repo_id``: into ``--dry_run DIR`` (nothing is uploaded), or to the Hub
as one commit (``robustvit.push_to_hub``). Exit status 0 on success, 1 when the folder cannot be published.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from robustvit.cli import main as robustvit_main


def main(argv: Sequence[str] | None = None) -> int:
    """``robustvit push`` with the same arguments (one publish path for the command line and this script)."""
    return robustvit_main(["push", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
