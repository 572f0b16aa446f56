"""Bad input gets a 4xx in OpenAI's error shape, never a 500, and the prompt is never logged."""

from __future__ import annotations

import logging

import httpx
import pytest

SECRET = "prompt-text-that-must-never-be-logged"
JSON = {"content-type": "application/json"}

CORPUS = [
    ("malformed json", b'{"model": "llama", "messages": [', JSON, 400),
    ("not an object", b'["llama"]', JSON, 400),
    ("non-utf8 bytes", b'{"model": "llama", "messages": "\xff\xfe"}', JSON, 400),
    ("empty body", b"", JSON, 400),
    ("model missing", b'{"messages": [{"role": "user", "content": "x"}]}', JSON, 400),
    ("model wrong type", b'{"model": 7, "messages": []}', JSON, 400),
    ("unknown model", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', JSON, 404),
    ("messages wrong type", b'{"model": "llama", "messages": "hi"}', JSON, 400),
    ("messages empty", b'{"model": "llama", "messages": []}', JSON, 400),
    ("stream wrong type", b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', JSON, 400),
    ("negative max_tokens", b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', JSON, 400),
    ("float max_tokens", b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', JSON, 400),
    ("huge max_tokens", b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999999}', JSON, 400),
    ("wrong content type", b'{"model": "llama"}', {"content-type": "text/plain"}, 415),
    ("no content type", b'{"model": "llama"}', {}, 415),
    ("oversize body", b'{"model": "llama", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}', JSON, 413),
    ("stream_options wrong type", b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream_options": 1}', JSON, 400),
]


@pytest.mark.parametrize("name,body,headers,status", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_4xx_in_openai_shape(stack, caplog, name, body, headers, status):
    caplog.set_level(logging.DEBUG)
    body = body.replace(b'"x"', f'"{SECRET}"'.encode())
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert r.headers["x-request-id"]
    assert SECRET not in caplog.text


def test_completions_and_embeddings_check_their_inputs(stack):
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": "llama", "prompt": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{stack.url}/v1/embeddings", json={"model": "llama"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_unknown_route_and_method(stack):
    assert httpx.get(f"{stack.url}/v1/nothing").status_code == 404
    r = httpx.get(f"{stack.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def _nested(depth: int) -> bytes:
    """A chat body whose deepest value sits ``depth`` levels down, the body object counted."""
    inner = depth - 1
    return (b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], "metadata": '
            + b"[" * inner + b"1" + b"]" * inner + b"}")


@pytest.mark.parametrize("depth", [254, 255, 1024, 1025, 5000])
def test_nesting_is_refused_beyond_254_levels_and_said_so(stack, depth):
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=_nested(depth), headers=JSON)
    if depth <= 254:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and "nested too deeply (at most 254 levels" in r.json()["error"]["message"]


def test_stream_null_is_a_plain_call(stack):
    r = httpx.post(f"{stack.url}/v1/chat/completions",
                   json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": None})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_host(stack):
    r = httpx.get(f"{stack.url}/v1/energy/", headers={"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers


@pytest.mark.parametrize("given", [".", "..", "..."])
def test_an_id_a_url_path_cannot_carry_is_replaced(stack, given):
    r = httpx.post(f"{stack.url}/v1/chat/completions", headers={"x-request-id": given},
                   json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] not in (given, "")
