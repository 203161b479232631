"""The request body limit on a real uvicorn: the limit itself passes, one byte more is a 413,
with a Content-Length or chunked, whether the endpoint reads its body or not."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request

from bots.bodylimit import BodyLimit
from tests.servers import run_asgi

LIMIT = 4096


def limited_app() -> FastAPI:
    api = FastAPI()
    api.add_middleware(BodyLimit, max_bytes=LIMIT)

    @api.post("/read")
    async def read(request: Request) -> dict[str, int]:
        return {"read": len(await request.body())}

    @api.post("/ignore")
    async def ignore() -> dict[str, str]:
        return {"read": "nothing"}

    return api


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with run_asgi(limited_app()) as url, httpx.Client(base_url=url, trust_env=False) as client:
        yield client


def pieces(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path", ["/read", "/ignore"])
def test_the_limit_passes_and_one_byte_more_is_refused(
    client: httpx.Client, chunked: bool, path: str
) -> None:
    for size, status in ((LIMIT, 200), (LIMIT + 1, 413), (LIMIT * 50, 413), (0, 200)):
        body = b"x" * size
        response = client.post(path, content=pieces(body) if chunked else body)
        assert response.status_code == status, (size, response.text)
        if status == 413:
            assert response.json() == {
                "detail": "the request body is larger than the limit of 4,096 bytes"
            }
        elif path == "/read":
            assert response.json() == {"read": size}
    # The connection is still good for the next request (the refused body was drained).
    assert client.post("/read", content=b"after").json() == {"read": 5}
