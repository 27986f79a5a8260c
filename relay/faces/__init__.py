"""The API faces: OpenAI's under /v1, and the old PHP-era service's under /api/v1.

Each face is one `Face` object (its prefixes, body reading, rules and reply shape) and
one blueprint built from it; everything else is the shared pipeline.
"""

from typing import Any

from flask import Flask

from relay.errors import ErrorShaper
from relay.face import Face
from relay.faces.legacy import LegacyFace
from relay.faces.openai import OpenAIFace
from relay.faces.routes import make_blueprint
from relay.i18n import Text
from relay.limits import Limits


def build_faces(config: dict[str, Any]) -> list[Face]:
    """The faces this relay serves, the legacy one with its configured rules."""
    legacy = LegacyFace(
        config["DEFAULT_MODEL"],
        config["DEFAULT_COMPLETION_MODEL"],
        config["LEGACY_MAX_CHARS"],
        config["LEGACY_LANGUAGE"],
    )
    return [OpenAIFace(), legacy]


def init_app(app: Flask, faces: list[Face], limits: Limits) -> None:
    """Register each face's blueprint."""
    for face in faces:
        app.register_blueprint(make_blueprint(face, limits))


def error_shaper(faces: list[Face]) -> ErrorShaper:
    """The error-body shaper for errors.init_app: the shape of the face a URL belongs to."""

    def shape(path: str, status: int, body: dict[str, Any], text: Text) -> dict[str, Any]:
        """Wrap an error body as the face owning a URL path does."""
        for face in faces:
            if face.owns(path):
                return face.shape_error(path, status, body, text)
        return body

    return shape
