"""A test double of a vLLM OpenAI-compatible server: real HTTP on 127.0.0.1, no GPU.

It speaks what sidpipe sends to vLLM: `GET /v1/models`, `POST /v1/chat/completions` with image
parts (base64 data URLs, decoded with Pillow: a broken image is a 400, as in vLLM) and with
structured output (`response_format` json_schema or vLLM's `structured_outputs`), and
`POST /v1/embeddings` with chat-style `messages` (GME through vLLM's pooling runner).

Like a vLLM server it has a capacity: at most `capacity` requests are processed at once, the rest
wait in its queue, and each takes `latency` seconds. Faults are injected by markers in the text of
a request, so a test decides per item what goes wrong:
    ALWAYS-500      every attempt answers 500
    FLAKY-500       the first 2 attempts of this request answer 500, then it succeeds
    RATE-429        the first attempt answers 429 with Retry-After: 0
    SLOW            the answer takes `slow_seconds` (beyond the client's timeout)
    BAD-JSON        structured output that is not JSON, every time
    BAD-JSON-ONCE   not JSON on the first attempt, valid afterwards
    TRUNCATE        finish_reason "length" with cut-off JSON, every time
and the faults a real vLLM cannot be made to show on demand (a proxy in front, a stuck engine,
a tiny random model):
    EMPTY-BODY      HTTP 200 with a zero-byte body, every time
    EMPTY-BODY-ONCE HTTP 200 with a zero-byte body on the first attempt, valid afterwards
    ERROR-200       HTTP 200 whose body is vLLM's error object
                    ({"object": "error", "message": ..., "type": "BadRequestError", "code": 400})
    ERROR-OBJ-200   HTTP 200 whose body is {"error": {"message": ..., "code": 400}} (proxies)
    NO-ANSWER       the connection is accepted and never answered (until the double stops)
    EMPTY-CONTENT   a chat answer whose content is "" (finish_reason "stop")
    DUP-TAGS        structured output with one interest tag repeated ("2-4 distinct" fails)
`faults` applies markers to every inference request (GET /models still answers, as a vLLM
whose engine is stuck does), `served_model` makes GET /models list another name than the model
requests are answered for, and `fail_first_attempts` makes every distinct request fail its first
N attempts with 500. Markers are upper case with a hyphen, so base64 image data never holds one.

Answers are deterministic functions of the request, so tests can compare runs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web
from PIL import Image


@dataclass
class DoubleStats:
    requests: Counter = field(default_factory=Counter)  # by path
    in_flight: int = 0
    max_in_flight: int = 0
    processing: int = 0
    attempts: Counter = field(default_factory=Counter)  # by request digest


class VLLMDouble:
    def __init__(
        self,
        model: str,
        capacity: int = 64,
        latency: float = 0.0,
        embed_dim: int = 32,
        fail_first_attempts: int = 0,
        slow_seconds: float = 5.0,
        faults: tuple[str, ...] | list[str] = (),
        served_model: str | None = None,
    ) -> None:
        self.model = model
        self.served_model = served_model or model
        self.faults = " ".join(faults)
        self.capacity = capacity
        self.latency = latency
        self.embed_dim = embed_dim
        self.fail_first_attempts = fail_first_attempts
        self.slow_seconds = slow_seconds
        self.stats = DoubleStats()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> str:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("vLLM double did not start")
        return self.url

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(10)

    def __enter__(self) -> VLLMDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        self._gate = asyncio.Semaphore(self.capacity)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        await self._stop_event.wait()
        await runner.cleanup()

    # -- handlers --------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.served_model, "object": "model"}]}
        )

    async def _admit(self, request: web.Request, body: dict) -> tuple[str, web.Response | None]:
        """Queue behind the capacity, then decide on injected faults."""
        self.stats.requests[request.path] += 1
        text = json.dumps(body, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        self.stats.attempts[digest] += 1
        attempt = self.stats.attempts[digest]
        text = f"{text} {self.faults}" if self.faults else text  # after the digest: same key
        if body.get("model") != self.model:
            return text, web.json_response(
                {"error": {"message": f"model {body.get('model')!r} does not exist"}}, status=404
            )
        if "NO-ANSWER" in text:
            await self._stop_event.wait()  # the client's timeout ends it first
            return text, web.Response(status=503)
        if "EMPTY-BODY" in text and not ("EMPTY-BODY-ONCE" in text and attempt > 1):
            return text, web.Response(status=200, body=b"", content_type="application/json")
        if "ERROR-200" in text:
            return text, web.json_response(
                {
                    "object": "error",
                    "message": "This model's maximum context length is 32768 tokens (injected)",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            )
        if "ERROR-OBJ-200" in text:
            return text, web.json_response(
                {"error": {"message": "upstream rejected the request (injected)", "code": 400}}
            )
        if (
            "ALWAYS-500" in text
            or ("FLAKY-500" in text and attempt <= 2)
            or (attempt <= self.fail_first_attempts)
        ):
            return text, web.json_response({"error": {"message": "injected"}}, status=500)
        if "RATE-429" in text and attempt == 1:
            return text, web.json_response(
                {"error": {"message": "busy"}}, status=429, headers={"Retry-After": "0"}
            )
        return text, None

    async def _work(self, text: str) -> None:
        async with self._gate:
            self.stats.processing += 1
            await asyncio.sleep(self.slow_seconds if "SLOW" in text else self.latency)
            self.stats.processing -= 1

    async def _tracked(self, request: web.Request, handler) -> web.Response:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
            text, refusal = await self._admit(request, body)
            if refusal is not None:
                return refusal
            await self._work(text)
            return await handler(body, text)
        finally:
            self.stats.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._tracked(request, self._chat_answer)

    async def _embeddings(self, request: web.Request) -> web.Response:
        return await self._tracked(request, self._embedding_answer)

    # -- answers ---------------------------------------------------------------------------------
    async def _chat_answer(self, body: dict, text: str) -> web.Response:
        images, words = _parts(body.get("messages", []))
        try:
            colours = [_dominant_colour(url) for url in images]
        except ValueError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        structured = (
            body.get("response_format", {}).get("type") == "json_schema"
            or "structured_outputs" in body
        )
        finish = "stop"
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        attempt = self.stats.attempts[digest]
        if structured:
            # The item's title line, as sidpipe's prompt lists it ("- Title: ...").
            user = words[-1] if words else ""
            title = next(
                (
                    line.split(":", 1)[1]
                    for line in user.splitlines()
                    if line.startswith("- Title:")
                ),
                user,
            )
            tokens = [t.strip(".,;:").lower() for t in title.split() if len(t) > 3][:3]
            # Like a real model, the answer depends on the whole prompt, not only the item.
            flavour = hashlib.sha256(" ".join(words[:-1]).encode()).hexdigest()[:4]
            answer = {
                "reasoning": f"Someone buying {title.strip()} cares about these things.",
                "interests": [f"{t} enthusiast" for t in tokens][:3] or ["general shopper"],
            }
            answer["interests"].append(f"style {flavour}")
            if "DUP-TAGS" in text:
                answer["interests"] = ["Style", "style", "style!"]
            content = json.dumps(answer)
            if "BAD-JSON" in text and not ("BAD-JSON-ONCE" in text and attempt > 1):
                content = "Sure! The interests are: fashion, style"
            if "TRUNCATE" in text:
                content, finish = content[: len(content) // 2], "length"
        else:
            colour = colours[0] if colours else "unseen"
            content = f"A {colour} product photographed on a plain background."
        if "EMPTY-CONTENT" in text:
            content = ""
        usage = {
            "prompt_tokens": sum(len(w) for w in words) // 4 + 64 * len(images),
            "completion_tokens": len(content) // 4,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response(
            {
                "id": "chatcmpl-double",
                "object": "chat.completion",
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": finish,
                        "message": {"role": "assistant", "content": content},
                    }
                ],
                "usage": usage,
            }
        )

    async def _embedding_answer(self, body: dict, text: str) -> web.Response:
        images, words = _parts(body.get("messages", []))
        try:
            for url in images:
                _dominant_colour(url)
        except ValueError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        vector = (np.random.default_rng(seed).standard_normal(self.embed_dim) * 3).tolist()
        return web.json_response(
            {
                "object": "list",
                "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "usage": {"prompt_tokens": len(text) // 4, "total_tokens": len(text) // 4},
            }
        )


def _parts(messages: list[dict]) -> tuple[list[str], list[str]]:
    images, words = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            words.append(content)
            continue
        for part in content or []:
            if part.get("type") == "image_url":
                images.append(part["image_url"]["url"])
            elif part.get("type") == "text":
                words.append(part["text"])
    return images, words


def _dominant_colour(url: str) -> str:
    if not url.startswith("data:image/"):
        if url.startswith("file://"):
            data = open(url[len("file://") :], "rb").read()
        else:
            raise ValueError(f"unsupported image url {url[:40]}")
    else:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"invalid base64 image: {exc}") from exc
    try:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - as vLLM: a 400 for an undecodable image
        raise ValueError(f"cannot identify image: {exc}") from exc
    r, g, b = pixels.reshape(-1, 3).mean(axis=0)
    return max((("red", r), ("green", g), ("blue", b)), key=lambda c: c[1])[0]


if __name__ == "__main__":  # for benchmarks: serve in its own process until killed
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(description="vLLM OpenAI-server test double")
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    server = VLLMDouble(args.model, capacity=args.capacity, latency=args.latency)
    print(server.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
        sys.exit(0)
