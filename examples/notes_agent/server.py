"""The notes MCP server the notes agent reads from: ``python -m examples.notes_agent.server``.

Serves over stdio by default, or streamable HTTP with ``--http PORT``. Notes come from the JSON
file named by ``NOTES_FILE`` (``{"n-1": {"title": ..., "body": ...}}``), else from a few seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

SEED_NOTES = {
    "n-1": {
        "title": "Quarterly planning",
        "body": "We agreed to ship the billing export in May, hire two engineers for the "
        "platform team, and retire the legacy importer by the end of the quarter.",
    },
    "n-2": {
        "title": "Incident 42 review",
        "body": "A misconfigured cache TTL caused stale prices for 40 minutes. Fix: validate "
        "TTLs in CI, page the owning team on cache anomalies.",
    },
    "n-3": {"title": "Lunch", "body": "Pizza on Friday."},
}


class Note(BaseModel):
    note_id: str
    title: str
    body: str


def load_notes() -> dict[str, dict[str, str]]:
    path = os.environ.get("NOTES_FILE")
    return json.loads(Path(path).read_text()) if path else SEED_NOTES


def build_server() -> MCPServer:
    server = MCPServer("notes", instructions="Read-only access to the team's notes.")
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False)

    @server.tool(annotations=read_only)
    def read_note(
        note_id: Annotated[str, Field(pattern=r"^n-\d+$", description="Note id, e.g. n-1")],
    ) -> Note:
        """Read one note: its title and body."""
        notes = load_notes()
        if note_id not in notes:
            raise ToolError(f"no note {note_id!r}; known: {', '.join(sorted(notes))}")
        return Note(note_id=note_id, **notes[note_id])

    @server.tool(annotations=read_only)
    def list_notes() -> list[str]:
        """The ids of all notes."""
        return sorted(load_notes())

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on PORT")
    options = parser.parse_args()
    server = build_server()
    if options.http:
        server.run("streamable-http", port=options.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
