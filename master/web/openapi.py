"""The OpenAPI document, generated from the app's routes and models (`python -m master.web.openapi` writes it).

Run it after changing a route or a model: a test checks docs/openapi.json against what the API serves.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from master.config import MasterConfig
from master.web.app import create_app
from master.web.context import MasterInfo, WebContext
from master.web.link import MasterLink
from master.web.tokens import TokenSet

DOCUMENT = Path(__file__).resolve().parent.parent.parent / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    """The document the app serves on /openapi.json (it depends on no setting or state)."""
    link = MasterLink("inproc://unused", None)
    try:
        ctx = WebContext(MasterConfig(), Path("/nonexistent"), MasterInfo("", 0, None), link,
                         TokenSet(Path("/nonexistent")))
        return create_app(ctx).openapi()
    finally:
        link.close()


def main() -> int:
    DOCUMENT.write_text(json.dumps(document(), indent=1) + "\n")
    print(f"wrote {DOCUMENT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
