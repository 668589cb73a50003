"""The cancel function: `chat.cancel` -> the chat ends once, with `chat.failed` code `cancelled`.

A client may cancel only its own chats: the task's client must be the one whose subject the
cancel came on. A running chat hears the cancel itself (every process that runs chats listens
on `ollama.chat.cancel.*`) and stops within a second. This function does what needs the task's
record: a parked request is taken out of the queue and ended here; for one that is running,
`cancel_requested` is written on its task, so a run that missed the broadcast sees it at its
next write, and a redelivery never starts it again.
"""

from __future__ import annotations

import logging
import time

from pydantic import ValidationError

from events.codec import Event
from events.outcome import Done, Outcome, Reject, Retry, invalid
from events.types import CLIENT_EXTENSION, ChatCancel
from stores.tasks import TERMINAL, Conflict

from .chat import Run, _fail
from .services import Services

log = logging.getLogger("functions.cancel")


async def handle(svc: Services, event: Event, attempt: int) -> Outcome:
    try:
        req = ChatCancel.model_validate(event.data)
    except ValidationError as exc:
        return Reject(invalid("chat.cancel", exc))
    client = event.extensions.get(CLIENT_EXTENSION)
    if not client:
        return Reject("chat.cancel without its client: publish it on ollama.chat.cancel.<client>")
    found = [
        t
        for t in await svc.tasks.find(req.task_id)
        if t.chat_id == req.chat_id and t.client == client
    ]
    if not found:
        log.info("cancel: no task %s in chat %s of %s", req.task_id, req.chat_id, client)
        return Done(f"no task {req.task_id} in chat {req.chat_id}")
    for rec in found:
        for _ in range(10):
            got = await svc.tasks.get(rec.source, rec.task_id)
            if got is None or got.record.state in TERMINAL:
                break
            now = time.time()
            current = got.record
            if current.state == "queued" and not current.owned_by_other("cancel", now):
                # Parked: nobody runs it. Claim it and end it here.
                claimed = current.model_copy(update={"owner": "cancel", "owner_until": now + 15})
                try:
                    rev = await svc.tasks.update(claimed, got.revision)
                except Conflict:
                    continue
                await _fail(Run(svc, claimed, rev, "cancel"), "cancelled", "cancelled while queued")
                log.info("cancelled queued task_id=%s", rec.task_id)
                break
            flagged = current.model_copy(update={"cancel_requested": True, "updated_at": now})
            try:
                await svc.tasks.update(flagged, got.revision)
            except Conflict:
                continue
            if current.owner is None or current.owner_until < now:
                # No live run: its redelivery will see the flag and end it as cancelled.
                log.info("cancel flagged on task_id=%s (no live run)", rec.task_id)
            else:
                log.info(
                    "cancel flagged on task_id=%s for its run (%s)", rec.task_id, current.state
                )
            break
        else:
            return Retry(0.5, f"task {req.task_id} kept changing")
    return Done()
