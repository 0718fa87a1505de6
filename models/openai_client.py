"""An async client for OpenAI-compatible model servers (vLLM), built for batch enrichment.

What it does for every request:
- keeps at most `max_in_flight` requests open per replica URL (enough to keep a vLLM batch
  full, never enough to flood it), and sends each request to the least busy replica;
- retries 429, 5xx, timeouts and connection errors with exponential backoff and full jitter
  (honouring `Retry-After`), moving to another replica when there is one; so are a 2xx with an
  empty or non-JSON body (what a proxy or a restarting server answers) and a 2xx whose body is
  an error object with a 5xx/429 code; an error object with another code (vLLM answers some
  errors so) fails at once with the server's message, never passing as an answer;
- counts requests, retries, failures and tokens.
A request that still fails after the last retry raises `RequestFailedError`; callers record it as a
per-item error and go on. `health_check()` fails fast, with the reason, when a server is down or
serves another model.

Knows HTTP and the OpenAI wire format, nothing about items, stages or storage. Built on aiohttp:
on a 2-core machine httpx's async client topped out near 140 requests/s of CPU, aiohttp near
2,800 (measured with bench/enrich_throughput.py's double), and a client must never be the
bottleneck of a GPU server.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidpipe.config import ModelEndpointConfig
from sidpipe.errors import EndpointUnavailableError
from sidpipe.redact import redact_urls

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailedError(RuntimeError):
    """One request failed for good (after retries, or with a non-retryable error)."""


# Retry backoff: exponential from the base, capped, with full jitter.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_in_flight_seen: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Replica:
    url: str
    slots: asyncio.Semaphore
    in_flight: int = 0

    @property
    def label(self) -> str:
        """The URL as errors name it: without credentials."""
        return redact_urls(self.url)


class OpenAICompatClient:
    """`async with OpenAICompatClient(config.caption) as client:` one model server's replicas."""

    def __init__(self, endpoint: ModelEndpointConfig) -> None:
        if not endpoint.urls:
            raise ValueError("an endpoint needs at least one URL")
        self.endpoint = endpoint
        self.usage = Usage()
        self._replicas = [
            _Replica(url, asyncio.Semaphore(self.endpoint.max_in_flight))
            for url in self.endpoint.urls
        ]
        key = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily, inside the running event loop
            connector = aiohttp.TCPConnector(
                limit=self.endpoint.max_in_flight * len(self._replicas),
                limit_per_host=self.endpoint.max_in_flight,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds),
            )
        return self._session

    async def __aenter__(self) -> OpenAICompatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- health ----------------------------------------------------------------------------------
    async def health_check(self, timeout: float = 10.0) -> None:
        """Every replica must answer GET /models and list the configured model."""
        problems = []
        for replica in self._replicas:
            try:
                async with self.session.get(
                    f"{replica.url}/models", timeout=aiohttp.ClientTimeout(total=timeout)
                ) as response:
                    response.raise_for_status()
                    listing = await response.json(content_type=None)
                served = [m.get("id") for m in listing.get("data", [])]
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
                problems.append(
                    f"{replica.label}: unreachable or not an OpenAI-compatible server "
                    f"({type(exc).__name__}: {redact_urls(str(exc))})"
                )
                continue
            if self.endpoint.model not in served:
                problems.append(f"{replica.label}: serves {served}, not {self.endpoint.model!r}")
        if problems:
            raise EndpointUnavailableError("; ".join(problems))

    # -- requests --------------------------------------------------------------------------------
    def _pick(self, avoid: _Replica | None) -> _Replica:
        candidates = [r for r in self._replicas if r is not avoid] or self._replicas
        least = min(r.in_flight for r in candidates)
        return self._rng.choice([r for r in candidates if r.in_flight == least])

    async def _attempt(self, replica: _Replica, path: str, body: dict[str, Any]):
        """One HTTP attempt: (status, text, headers) or (None, error, {}) when no answer came."""
        async with replica.slots:
            replica.in_flight += 1
            self.usage.max_in_flight_seen = max(self.usage.max_in_flight_seen, replica.in_flight)
            self.usage.requests += 1
            try:
                async with self.session.post(f"{replica.url}{path}", json=body) as response:
                    return response.status, await response.text(), response.headers
            except TimeoutError:
                return (
                    None,
                    f"timeout after {self.endpoint.timeout_seconds:g}s from {replica.label}",
                    {},
                )
            except aiohttp.ClientError as exc:
                return (
                    None,
                    f"{type(exc).__name__} from {replica.label}: {redact_urls(str(exc))}",
                    {},
                )
            finally:
                replica.in_flight -= 1

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to `path` on a replica; retried as described above."""
        last_error = "no attempt"
        avoid: _Replica | None = None
        for attempt in range(self.endpoint.max_retries + 1):
            replica = self._pick(avoid)
            status, text, headers = await self._attempt(replica, path, body)
            retry_after = None
            if status is None:
                last_error = text
            elif status < 300:
                try:
                    payload = json.loads(text) if text.strip() else None
                except ValueError:
                    payload = None
                error = _error_in(payload)
                if payload is None:
                    # Empty or cut off: a proxy's or a restarting server's answer, so transient.
                    last_error = (
                        f"empty response body (HTTP {status}, {len(text.encode())} bytes) "
                        f"from {replica.label}"
                        if not text.strip()
                        else f"invalid JSON body (HTTP {status}) from {replica.label}: "
                        + text[:80].replace("\n", " ")
                    )
                elif error is not None:
                    message, code = error
                    last_error = f"HTTP {status} with an error body from {replica.label}: {message}"
                    if code is None or not (code in RETRY_STATUS or code >= 500):
                        self.usage.failures += 1
                        raise RequestFailedError(last_error)
                else:
                    self._count_tokens(payload)
                    return payload
            else:
                last_error = f"HTTP {status} from {replica.label}: " + text[:200].replace("\n", " ")
                if status not in RETRY_STATUS:
                    self.usage.failures += 1
                    raise RequestFailedError(last_error)
                retry_after = _retry_after(headers)
            if attempt == self.endpoint.max_retries:
                break
            self.usage.retries += 1
            avoid = replica if len(self._replicas) > 1 else None
            await asyncio.sleep(self._backoff(attempt, retry_after))
        self.usage.failures += 1
        raise RequestFailedError(f"{last_error} (after {self.endpoint.max_retries} retries)")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * (2**attempt))
        delay = self._rng.uniform(0, cap)  # full jitter: retries from many items spread out
        return max(delay, retry_after or 0.0)

    def _count_tokens(self, payload: dict[str, Any]) -> None:
        usage = payload.get("usage") or {}
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> tuple[str, str]:
        """(content, finish_reason) of one chat completion."""
        payload = await self.post(
            "/chat/completions",
            {"model": self.endpoint.model, "messages": messages, **self.endpoint.extra_body}
            | params,
        )
        try:
            choice = payload["choices"][0]
            return choice["message"]["content"] or "", choice.get("finish_reason") or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise RequestFailedError(f"malformed chat completion: missing {exc}") from None

    async def embed(self, body: dict[str, Any]) -> list[float]:
        """One embedding from /embeddings (body without the model name)."""
        payload = await self.post(
            "/embeddings", {"model": self.endpoint.model, **self.endpoint.extra_body} | body
        )
        try:
            return payload["data"][0]["embedding"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RequestFailedError(f"malformed embeddings response: missing {exc}") from None


def _error_in(payload: Any) -> tuple[str, int | None] | None:
    """(message, code) when a 2xx body is an error, not an answer: vLLM's own error object
    (`{"object": "error", "message", "type", "code"}`) or the OpenAI/proxy form
    (`{"error": {"message", "type", "code"}}`). An answer with no choices is not one of these."""
    if not isinstance(payload, dict):
        return None
    if payload.get("object") == "error":
        error = payload
    elif isinstance(payload.get("error"), dict | str) and not (
        "choices" in payload or "data" in payload
    ):
        error = payload["error"]
        error = error if isinstance(error, dict) else {"message": error}
    else:
        return None
    message = str(error.get("message") or "no message")[:300].replace("\n", " ")
    kind = error.get("type")
    code = error.get("code")
    code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
    detail = ", ".join(str(v) for v in (kind, code) if v not in (None, ""))
    return (f"{message} ({detail})" if detail else message), code


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        return None


async def map_bounded(items: list[Any], worker, concurrency: int) -> list[Any]:
    """Run `worker(item)` for every item with at most `concurrency` at once; results in order.

    A worker's exception is returned in place of its result, so one item never stops the rest.
    """
    gate = asyncio.Semaphore(concurrency)

    async def run(item: Any) -> Any:
        async with gate:
            try:
                return await worker(item)
            except Exception as exc:  # noqa: BLE001 - per-item error, recorded by the caller
                return exc

    return await asyncio.gather(*(run(item) for item in items))
