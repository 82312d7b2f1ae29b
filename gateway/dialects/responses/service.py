"""Serving the Responses API: history from the store, one chat call through
the Pipeline, the answer back as a Response (or its stream of events).

Three entries share one path: `create` for the HTTP route, and `run` for the
workers (background responses, which are async jobs, and Batch API lines).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from gateway.dialects.responses import events, store, translate
from gateway.dialects.responses.protocol import refusal
from gateway.dialects.responses.store import StoredResponse
from gateway.errors import APIError
from gateway.pipeline import Call, Outcome, Pipeline
from gateway.resilience.dependencies import Dependencies, unavailable
from gateway.sse import parse_event

log = logging.getLogger("bearpaw.responses")

API = "responses"


class JobQueue(Protocol):
    async def enqueue(self, call: Call) -> Any: ...


class ResponsesService:
    def __init__(
        self, pipeline: Pipeline, engine: Engine, dependencies: Dependencies | None = None
    ) -> None:
        self.pipeline = pipeline
        self.engine = engine
        self.dependencies = dependencies

    def _require_database(self, body: dict[str, Any]) -> None:
        """A stored, chained or background response needs the database: while it
        is known to be down, refuse before generating rather than generate an
        answer that cannot be kept (store: false still works)."""
        deps = self.dependencies
        if deps is None or not deps.is_down("database"):
            return
        if body.get("store", True) or body.get("previous_response_id") or body.get("background"):
            raise unavailable("database", why="stored responses live there; store: false does not")

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ entries
    async def create(self, call: Call, jobs: JobQueue | None, respond_async: bool) -> Outcome:
        """POST /v1/responses (`call.body` is validated, `call.endpoint` is "responses")."""
        body = call.body
        try:
            problem = refusal(body)
            if problem is not None:
                raise APIError(400, problem.message, param=problem.param, code="unsupported")
            self._require_database(body)
            if body.get("background") or respond_async:
                if jobs is None:
                    raise APIError(400, "Background responses are not enabled on this gateway.")
                return await self._enqueue(call, jobs, respond_async)
            context = await self._history(call)
        except APIError as exc:
            await self.pipeline.reject(call, exc)
            raise
        return await self._answer(call, context)

    async def run(self, call: Call) -> Outcome:
        """A response run by a worker: a background response (`source` async,
        its row already queued) or a Batch API line (never streamed)."""
        body = {**call.body, "stream": False}
        call = replace(call, body=body)
        if call.source == "async":
            return await self._run_background(call)
        try:
            problem = refusal(body)
            if problem is not None:
                raise APIError(400, problem.message, param=problem.param, code="unsupported")
            context = await self._history(call)
        except APIError as exc:
            await self.pipeline.reject(call, exc)
            return Outcome(exc.status, exc.body())
        try:
            return await self._answer(call, context)
        except APIError as exc:  # already metered by _answer
            return Outcome(exc.status, exc.body())

    # ------------------------------------------------------------------ history
    async def _history(self, call: Call) -> list[dict[str, Any]]:
        previous = call.body.get("previous_response_id")
        if not previous:
            return []
        row: StoredResponse | None = await self._db(
            store.get, self.engine, call.caller.tenant_id, previous
        )
        if row is None:
            raise APIError(
                404,
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if row.status not in ("completed", "incomplete"):
            raise APIError(
                400,
                f"Previous response with id '{previous}' has status '{row.status}'; only a "
                "finished response can be continued.",
                param="previous_response_id",
                code="invalid_state",
            )
        return row.conversation()

    # ------------------------------------------------------------------ answer
    def _prepare(
        self, call: Call, context: list[dict[str, Any]]
    ) -> tuple[translate.ItemIds, list[dict[str, Any]], Call]:
        ids = translate.ItemIds(call.request_id)
        items = translate.input_items(call.body["input"], lambda i: _input_id(ids, i))
        return ids, items, _chat_call(call, [*context, *items])

    async def _answer(self, call: Call, context: list[dict[str, Any]]) -> Outcome:
        created = time.time()
        try:
            ids, items, chat = self._prepare(call, context)
        except APIError as exc:
            await self.pipeline.reject(call, exc)
            raise
        outcome = await self.pipeline.run(chat)
        if outcome.stream is not None:
            return Outcome(
                200,
                None,
                outcome.headers,
                stream=self._events(call, ids, context, items, outcome.stream, created),
            )
        if outcome.status >= 400 or outcome.body is None:
            return outcome
        response = translate.from_chat(ids.response, call.body, outcome.body, ids, created)
        await self._keep(call, context, items, response)
        return Outcome(200, response, outcome.headers)

    async def _keep(
        self,
        call: Call,
        context: list[dict[str, Any]],
        items: list[dict[str, Any]],
        response: dict[str, Any],
    ) -> None:
        if call.body.get("store") is False:
            return
        await self._db(
            store.insert,
            self.engine,
            StoredResponse(
                id=response["id"],
                tenant_id=call.caller.tenant_id,
                request_id=call.request_id,
                previous_response_id=call.body.get("previous_response_id"),
                model=str(call.body.get("model")),
                status=response["status"],
                context_items=context,
                input_items=items,
                response=response,
            ),
        )

    async def _events(
        self,
        call: Call,
        ids: translate.ItemIds,
        context: list[dict[str, Any]],
        items: list[dict[str, Any]],
        chunks: AsyncIterator[bytes],
        created: float,
    ) -> AsyncIterator[bytes]:
        state = events.StreamState(ids.response, call.body, ids, created)
        for event in events.start(state):
            yield event
        done = False
        error: str | None = None
        try:
            async for raw in chunks:
                if raw.startswith(b"data: [DONE]"):
                    done = True
                    continue
                data = parse_event(raw)
                if data is None:
                    continue
                if "error" in data and not data.get("choices"):
                    error = str((data["error"] or {}).get("message") or "backend error")
                    continue
                for event in events.on_chunk(state, data):
                    yield event
        finally:
            # Closing the chat stream settles its usage record even when this
            # client went away mid-stream.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        if not done or error is not None:
            state.broken = True
            for event in events.close_items(state):
                yield event
            for event in events.failed(state, error or "The backend stream ended early."):
                yield event
            return
        for event in events.close_items(state):
            yield event
        response = events.final_response(state)
        # Stored before the client hears `response.completed`, as usage is
        # recorded before a chat stream's [DONE].
        await self._keep(call, context, items, response)
        yield events.finished(state, response)

    # ------------------------------------------------------------------ background
    async def _enqueue(self, call: Call, jobs: JobQueue, respond_async: bool) -> Outcome:
        context = await self._history(call)
        ids = translate.ItemIds(call.request_id)
        items = translate.input_items(call.body["input"], lambda i: _input_id(ids, i))
        body = {**call.body, "background": True}
        response = translate.response_object(ids.response, body, status="queued")
        await self._db(
            store.insert,
            self.engine,
            StoredResponse(
                id=ids.response,
                tenant_id=call.caller.tenant_id,
                request_id=call.request_id,
                previous_response_id=body.get("previous_response_id"),
                model=str(body.get("model")),
                status="queued",
                background=True,
                context_items=context,
                input_items=items,
                response=response,
            ),
        )
        await jobs.enqueue(replace(call, body=body))
        headers = {"x-request-id": call.request_id}
        if respond_async:
            headers["location"] = f"/v1/responses/{ids.response}"
            return Outcome(202, response, headers)
        return Outcome(200, response, headers)

    async def _run_background(self, call: Call) -> Outcome:
        response_id = translate.response_id_for(call.request_id)
        started = await self._db(
            store.move, self.engine, response_id, "in_progress", from_=("queued", "in_progress")
        )
        row: StoredResponse | None = await self._db(
            store.get, self.engine, call.caller.tenant_id, response_id
        )
        if not started or row is None:
            # Cancelled or deleted before a worker got to it: nothing to run.
            return Outcome(200, row.as_object() if row else None)
        ids = translate.ItemIds(call.request_id)
        chat = _chat_call(call, [*row.context_items, *row.input_items])
        created = row.response.get("created_at") or time.time()
        outcome = await self.pipeline.run(chat)
        if outcome.status >= 400 or outcome.body is None:
            message = _message(outcome.body)
            response = translate.failed(response_id, call.body, message, created, _code(outcome))
        else:
            response = translate.from_chat(response_id, call.body, outcome.body, ids, created)
        if not await self._db(
            store.finish, self.engine, response_id, response, only_if="in_progress"
        ):
            log.info("background response %s was cancelled while it ran", response_id)
            row = await self._db(store.get, self.engine, call.caller.tenant_id, response_id)
            return Outcome(200, row.as_object() if row else None)
        return Outcome(200 if outcome.status < 400 else outcome.status, response)


def _chat_call(call: Call, items: list[dict[str, Any]]) -> Call:
    """The chat completion call that answers `call` over conversation `items`:
    same caller, request id and source, metered as a Responses request."""
    messages = translate.chat_messages(call.body.get("instructions"), items)
    return replace(
        call, endpoint="chat.completions", body=translate.chat_body(call.body, messages), api=API
    )


def _input_id(ids: translate.ItemIds, index: int) -> str:
    return f"msg_{ids.stem}_in{index}"


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "The model failed to generate a response.")
    return "The model failed to generate a response."


def _code(outcome: Outcome) -> str:
    return "rate_limit_exceeded" if outcome.status == 429 else "server_error"
