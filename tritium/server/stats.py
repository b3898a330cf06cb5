"""The server's log lines (through `logging`, logger "tritium.server"): one per finished request, and a periodic
stats line while the engine works (vLLM's pair; `tritium serve --disable-log-requests` drops the first)."""

import logging
import time

from tritium.engine.llm_engine import LLMEngine

logger = logging.getLogger("tritium.server")


def log_request(request_id: str, status: int, prompt_tokens: int, output_tokens: int, latency: float) -> None:
    """`status`: the HTTP status the request's answer has (499: the client left first)."""
    logger.info("request %s: status %d, prompt tokens %d, output tokens %d, latency %.3f s", request_id, status,
                prompt_tokens, output_tokens, latency)


class StatsLog:
    """Tokens counted by the engine thread as they come; `maybe_log` writes a line once `interval` seconds have
    passed since the last: prompt and generation throughput over them, requests running and waiting, KV-cache use."""

    def __init__(self, engine: LLMEngine, interval: float) -> None:
        self.engine, self.interval = engine, interval
        self.prompt_tokens = self.generation_tokens = 0
        self._since = time.monotonic()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._since < self.interval:
            return
        elapsed, self._since = now - self._since, now
        sched, pages = self.engine.scheduler, self.engine.pages
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting} - running
        logger.info("prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, running %d requests, "
                    "waiting %d requests, KV-cache usage %.1f%%", self.prompt_tokens / elapsed,
                    self.generation_tokens / elapsed, len(running), len(waiting),
                    100 * (1 - pages.num_free / pages.num_pages))
        self.prompt_tokens = self.generation_tokens = 0
