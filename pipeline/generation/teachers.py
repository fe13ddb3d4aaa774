"""Teachers behind one interface, and the content-hash request cache that makes generation resumable.

A teacher answers `Request`s: `await teacher.complete(requests, done)` calls `done(request, text)` as each
reply arrives (in any order). Three kinds:
  - `OracleTeacher`: the task world answers in the style its system prompt asks for, and (for preference
    pairs) makes plausible mistakes at a set rate.
  - `OpenAITeacher`: any OpenAI-compatible /chat/completions endpoint; async with a concurrency limit, an
    optional rate limit, retries with exponential backoff on 429/5xx/timeouts/malformed replies. A slot is
    held only while an attempt is in flight (never while backing off), retries get the next free slot
    first, and a stalled request is hedged with a second copy. A reply cut at max_tokens is marked.
  - `TransformersTeacher`: a local model, batched `generate`.
The API key is read from the environment variable the recipe names, sent only as a header, and scrubbed
from every error message; request keys hash the teacher's identity (endpoint, model, sampling), not the key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable

from pipeline.config import RecipeError, RunError
from pipeline.tasks import ANSWER_PREFIX, Example, get_task


class TeacherError(RunError):
    """A request that still failed after all retries (finished requests stay cached; rerun to resume).
    `cli()` prints it as one `error:` line and exits 1."""


@dataclasses.dataclass(frozen=True)
class Request:
    key: str
    messages: tuple[dict, ...]
    sample: int = 0
    seed: int = 0
    example: Example | None = None  # the task-world example behind the query, if any (the oracle needs it)
    style: str = "steps"  # what the system prompt asks for (the oracle follows it)


def request_key(teacher_id: str, messages, sample: int, seed: int) -> str:
    blob = json.dumps([teacher_id, list(messages), sample, seed], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# done(request, text, truncated): truncated = the reply was cut at the token limit (not a complete sample)
Done = Callable[[Request, str, bool], None]


# ---------------------------------------------------------------------------------------------
# The task-world oracle
# ---------------------------------------------------------------------------------------------


def render(example: Example, style: str) -> str:
    """The example's solution in `style`; every style ends with the `Answer:` line the verifiers read."""
    answer = f"{ANSWER_PREFIX} {example.answer}"
    if style == "concise" or not example.steps:  # a query from a file may come without worked steps
        return answer
    steps = "\n".join(example.steps)
    if style == "steps":
        return f"{steps}\n{answer}"
    # No closing restatement of the result: for a ~1M model each extra copy of the answer is one more
    # place to slip (measured: right steps, then a miscopied "So the result is ..." line).
    description = get_task(example.task).description
    return f"The task is to {description}.\n{steps}\n{answer}"


@dataclasses.dataclass
class OracleTeacher:
    name: str = "oracle"
    wrong_rate: float = dataclasses.field(
        default=0.0, metadata={"help": "Probability that a sample carries a plausible mistake (for DPO pairs)."})

    def __post_init__(self):
        if not 0.0 <= self.wrong_rate <= 1.0:
            raise ValueError("key 'wrong_rate' must be in [0, 1]")

    @property
    def identity(self) -> str:
        return f"oracle:{self.wrong_rate}"

    def reply(self, request: Request) -> str:
        if request.example is None:
            raise RecipeError(f"teacher '{self.name}': the oracle only answers task-world queries (rows with a "
                              "known 'task' and 'answer')")
        rng = random.Random(request.key)
        example = request.example
        if rng.random() < self.wrong_rate:
            example = get_task(example.task).wrong(example, rng)
        return render(example, request.style)

    async def complete(self, requests: list[Request], done: Done) -> None:
        for r in requests:
            done(r, self.reply(r), False)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------------------------


class _Slots:
    """A concurrency limit that serves retries before first attempts (then in arrival order). With a plain
    FIFO semaphore a retried request queues behind every request not yet started, so the retries pile up at
    the end of the run and its tail grows by a whole queue per failure."""

    def __init__(self, n: int):
        self.free, self._waiters, self._seq = n, [], itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, attempt: int):
        if self.free > 0 and not self._waiters:
            self.free -= 1
        else:
            fut = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (-attempt, next(self._seq), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed the slot just as it was cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = heapq.heappop(self._waiters)[2]
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class OpenAITeacher:
    base_url: str = dataclasses.field(metadata={"help": "e.g. https://api.openai.com/v1 or http://localhost:8000/v1"})
    model: str = dataclasses.field(metadata={"help": "Model name the endpoint serves."})
    name: str = "openai"
    api_key_env: str | None = dataclasses.field(
        default=None, metadata={"help": "Name of the environment variable holding the API key (never the key)."})
    concurrency: int = 16
    requests_per_second: float | None = dataclasses.field(default=None, metadata={"help": "Optional rate limit."})
    max_retries: int = 6
    timeout_s: float = 120.0
    hedge_after_s: float | None = dataclasses.field(
        default=None, metadata={"help": "Send a second copy of a request that has not answered after this many "
                                "seconds (first answer wins). Default: 2x the 95th percentile latency seen so far "
                                "(after 20 replies); <= 0: never."})
    backoff_s: float = dataclasses.field(default=0.5, metadata={"help": "First retry delay; doubles per attempt."})
    max_backoff_s: float = 30.0
    temperature: float = 0.7
    max_tokens: int = 1024

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("keys 'concurrency' >= 1, 'max_retries' >= 0 and 'timeout_s' > 0 are required")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise ValueError("key 'requests_per_second' must be > 0")
        self._next_slot = 0.0
        self._latencies: list[float] = []  # of successful attempts: the hedging threshold
        self.stats: collections.Counter = collections.Counter()  # retries, hedged

    @property
    def identity(self) -> str:
        return f"openai:{self.base_url.rstrip('/')}:{self.model}:{self.temperature}:{self.max_tokens}"

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RecipeError(f"teacher '{self.name}': environment variable {self.api_key_env} (api_key_env) is not set")
        return key

    async def _throttle(self) -> None:
        if not self.requests_per_second:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.requests_per_second
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _attempt(self, session, url: str, payload: dict, headers: dict,
                       scrub: Callable[[str], str]) -> tuple[str, bool]:
        """One HTTP exchange: (text, truncated), or _Retryable / TeacherError / a timeout / a client error."""
        import aiohttp

        start = time.monotonic()
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
            body = await resp.text()
            if resp.status == 429 or resp.status >= 500:
                ra = resp.headers.get("Retry-After")
                wait = float(ra) if ra and ra.replace(".", "").isdigit() else None
                raise _Retryable(scrub(f"HTTP {resp.status}: {_server_message(body)}"), wait)
            if resp.status >= 400:  # a bad request will not get better by retrying
                raise TeacherError(scrub(f"teacher '{self.name}': HTTP {resp.status}: {_server_message(body)}"))
            choice = json.loads(body)["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise _Retryable("reply has no text content")
            self._latencies.append(time.monotonic() - start)
            if len(self._latencies) > 512:
                del self._latencies[:-256]
            # Cut at max_tokens: not a complete sample. Asking again with the same seed would cut it again, so
            # it is kept (cached, marked) and left out of the SFT/DPO rows.
            return content, choice.get("finish_reason") == "length"

    def _hedge_after(self) -> float | None:
        if self.hedge_after_s is not None:
            return self.hedge_after_s if self.hedge_after_s > 0 else None
        recent = sorted(self._latencies[-256:])
        if len(recent) < 20:
            return None
        return 2.0 * recent[int(0.95 * (len(recent) - 1))]

    async def _hedged(self, attempt: Callable) -> tuple[str, bool]:
        """`attempt()`, plus a copy whenever no copy has answered for `_hedge_after()` seconds: the first answer
        wins, the rest are cancelled. The original runs on to its timeout; a stalled copy gives way to the next
        (at most 2 in flight per slot, `max_retries` copies). A hung request so costs its slot a few latencies,
        not the whole timeout (Dean & Barroso, "The Tail at Scale")."""
        original = asyncio.ensure_future(attempt())
        pending, hedges, started = {original}, 0, time.monotonic()
        try:
            while True:
                stall = self._hedge_after() if hedges < self.max_retries else None
                if stall is not None:
                    timeout = max(0.0, started + stall - time.monotonic())
                else:  # no threshold yet (too few replies): look again in a second
                    timeout = 1.0 if hedges < self.max_retries and self.hedge_after_s is None else None
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if stall is not None:  # stalled: the newest copy gives way to a fresh one
                        hedges += 1
                        self.stats["hedged"] += 1
                        for t in pending - {original}:
                            t.cancel()
                        pending = {t for t in pending if t is original} | {asyncio.ensure_future(attempt())}
                        started = time.monotonic()
                    continue
                finished = next(iter(done))
                if finished.exception() is None or not pending:
                    return finished.result()
        finally:
            for t in pending:
                t.cancel()

    async def _post(self, session, slots: _Slots, request: Request, headers: dict,
                    scrub: Callable[[str], str]) -> tuple[str, bool]:
        import aiohttp

        payload = {"model": self.model, "messages": list(request.messages), "temperature": self.temperature,
                   "max_tokens": self.max_tokens, "seed": request.seed * 1000 + request.sample, "n": 1}
        url = self.base_url.rstrip("/") + "/chat/completions"
        rng = random.Random(request.key)
        last, malformed = "no attempt", 0
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                async with slots.slot(attempt):  # held only while an attempt is in flight, never while backing off
                    await self._throttle()
                    return await self._hedged(lambda: self._attempt(session, url, payload, headers, scrub))
            except _Retryable as e:
                last, retry_after = str(e), e.retry_after
            except asyncio.TimeoutError:
                last = f"timeout after {self.timeout_s}s"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                # A torn or malformed body is a transport glitch, not a sign of load: the first one is asked
                # again at once.
                last, retry_after = f"malformed reply ({type(e).__name__}: {e})", 0.0 if not malformed else None
                malformed += 1
            except aiohttp.ClientError as e:
                last = f"{type(e).__name__}: {e}"
            self.stats["retries"] += 1
            if attempt < self.max_retries:
                # The server's Retry-After when it sends one; else exponential backoff with jitter.
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + 0.5 * rng.random())
                await asyncio.sleep(retry_after if retry_after is not None else delay)
        raise TeacherError(scrub(f"teacher '{self.name}': {self.base_url}: request {request.key[:12]} failed "
                                 f"after {self.max_retries + 1} attempts (last: {last}); "
                                 "finished replies are cached, rerun to resume"))

    async def complete(self, requests: list[Request], done: Done) -> None:
        import aiohttp

        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        def scrub(text: str) -> str:
            return text.replace(key, "***") if key else text

        slots = _Slots(self.concurrency)
        # Room for one hedged copy per slot: the stalled original keeps its connection until it is cancelled.
        connector = aiohttp.TCPConnector(limit=2 * self.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(r: Request) -> None:
                text, truncated = await self._post(session, slots, r, headers, scrub)
                done(r, text, truncated)

            tasks = [asyncio.ensure_future(one(r)) for r in requests]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # the first hard failure cancels the rest (their finished replies are cached)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise


def _server_message(body: str) -> str:
    """The error text an OpenAI-compatible server sends ({"error": {"message": ...}}), else the body's start."""
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if isinstance(message, str) and message:
            return message[:300]
    except (json.JSONDecodeError, AttributeError):
        pass
    return body[:200].strip() or "(empty body)"


# ---------------------------------------------------------------------------------------------
# Local transformers model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TransformersTeacher:
    model_name_or_path: str = dataclasses.field(metadata={"help": "A local model directory (or cached hub id)."})
    name: str = "local"
    batch_size: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256

    @property
    def identity(self) -> str:
        return f"transformers:{self.model_name_or_path}:{self.temperature}:{self.top_p}:{self.max_new_tokens}"

    async def complete(self, requests: list[Request], done: Done) -> None:
        import torch

        from pipeline.evaluate import generate_replies, load_for_generation

        model, tokenizer = load_for_generation(self.model_name_or_path)
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if self.temperature > 0 else {}
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            # Seeded by the batch's request keys: a rerun after a kill reproduces the same replies.
            torch.manual_seed(int(hashlib.sha256("".join(r.key for r in batch).encode()).hexdigest()[:8], 16))
            replies = generate_replies(model, tokenizer, [list(r.messages) for r in batch], len(batch),
                                       self.max_new_tokens, **sampling)
            for r, text in zip(batch, replies):
                done(r, text, False)
            await asyncio.sleep(0)


TEACHER_TYPES = {"oracle": OracleTeacher, "openai": OpenAITeacher, "transformers": TransformersTeacher}


def make_teacher(spec: dict, where: str):
    """A teacher from a recipe mapping {type: oracle|openai|transformers, ...}; bad keys are one-line errors."""
    if not isinstance(spec, dict) or spec.get("type") not in TEACHER_TYPES:
        raise RecipeError(f"{where}: needs 'type', one of {', '.join(TEACHER_TYPES)}")
    cls = TEACHER_TYPES[spec["type"]]
    valid = [f.name for f in dataclasses.fields(cls)]
    if "api_key" in spec:
        raise RecipeError(f"{where}: never put an API key in a recipe; name its environment variable in 'api_key_env'")
    for k in spec:
        if k != "type" and k not in valid:
            raise RecipeError(f"{where}: unknown key '{k}' for teacher type '{spec['type']}' (valid: {', '.join(valid)})")
    from pipeline.validation import check_teacher_spec  # types and ranges; never echoes a secret

    kwargs = check_teacher_spec(cls, spec, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# LLM judge (UltraFeedback-style 1-10 rating)
# ---------------------------------------------------------------------------------------------

JUDGE_SYSTEM = ("You are a strict grader. Rate the assistant's reply to the user's request for correctness, "
                "helpfulness, honesty and how well it follows the system instruction, on a scale from 1 (useless "
                "or wrong) to 10 (correct, clear, complete). Reply with one short reason, then a last line "
                "'Rating: <1-10>'.")
_RATING_RE = re.compile(r"Rating:\s*\[?(\d+(?:\.\d+)?)")


def judge_messages(messages, reply: str) -> tuple[dict, ...]:
    convo = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
    return ({"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"{convo}\n\n[assistant reply to rate]\n{reply}"})


def parse_rating(text: str) -> float | None:
    """The last `Rating: n` in a judge's reply, if it is within 1..10; None if absent or out of range."""
    found = _RATING_RE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


# ---------------------------------------------------------------------------------------------
# Request cache
# ---------------------------------------------------------------------------------------------


class RequestCache:
    """Finished requests as jsonl lines {"key", "reply"} (plus "truncated": true for a reply cut at the token
    limit, kept in `truncated`): appended and flushed as each reply arrives, fsynced
    at least once a second and on close. A run killed mid-write leaves at most one torn last line, which is cut
    off on the next open; the request is then simply asked again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.replies: dict[str, str] = {}
        self.truncated: set[str] = set()
        good = 0
        if self.path.is_file():
            data = self.path.read_bytes()
            lines = data.split(b"\n")
            for n, line in enumerate(lines, 1):
                if not line:
                    continue
                try:
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]
                    if row.get("truncated"):
                        self.truncated.add(row["key"])
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    if n < len(lines) - 1:  # only the last line can be torn: anything else is damage
                        raise RecipeError(f"{self.path}: line {n} is not a cache record; "
                                          "delete the file to start over") from None
                    break
                good += len(line) + 1
            if good < len(data):
                with self.path.open("r+b") as fh:
                    fh.truncate(good)
        self._fh = self.path.open("a", encoding="utf-8")
        self._synced = time.monotonic()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str, truncated: bool = False) -> None:
        if key in self.replies:
            return
        self.replies[key] = reply
        record = {"key": key, "reply": reply}
        if truncated:
            self.truncated.add(key)
            record["truncated"] = True
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()  # in the OS after this: a kill -9 cannot lose it
        if time.monotonic() - self._synced > 1.0:  # on disk after this: a power loss cannot either
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def run_requests(teacher, requests: list[Request], cache: RequestCache, desc: str) -> dict[str, str]:
    """Replies for all `requests` (key -> text): cached ones reused, the rest asked for and cached as they come."""
    from tqdm.auto import tqdm

    unique = {r.key: r for r in requests}
    pending = [r for k, r in unique.items() if cache.get(k) is None]
    bar = tqdm(total=len(unique), initial=len(unique) - len(pending), desc=desc, unit="req", dynamic_ncols=True,
               mininterval=1.0)

    def done(r: Request, text: str, truncated: bool = False) -> None:
        cache.put(r.key, text, truncated)
        bar.update()

    try:
        if pending:
            asyncio.run(teacher.complete(pending, done))
    finally:
        bar.close()
    return {k: cache.get(k) for k in unique}
