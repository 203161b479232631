"""Validate a raw JSON request body into a pydantic model, with FastAPI-shaped error details.

Used where a body is read by hand instead of by FastAPI: bodies sent without a JSON
Content-Type (some SDKs do), bodies that are not UTF-8, text that cannot be stored.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class BodyInvalid(ValueError):
    """The body is not a valid instance; `errors` are FastAPI-style details (loc starts "body")."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__(errors[0]["msg"] if errors else "invalid body")


def validate_json(raw: bytes, model: type[ModelT]) -> ModelT:
    """The body as `model`, or BodyInvalid saying why."""
    if not raw.strip():
        raise BodyInvalid([{"type": "missing", "loc": ["body"], "msg": "Field required"}])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyInvalid(
            [{"type": "json_invalid", "loc": ["body"], "msg": "the body is not UTF-8 JSON"}]
        ) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        # exc.json() turns ctx values (exceptions) into text the JSON encoder can take.
        errors = json.loads(exc.json(include_url=False))
        for error in errors:
            error["loc"] = ["body", *error["loc"]]
        raise BodyInvalid(errors) from None
