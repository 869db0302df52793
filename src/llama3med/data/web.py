"""HTTP reads for the data commands: whole or not at all, retried where retrying can help, several at once;
and whether a host is a public one."""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

RETRIES = 3
GIVE_UP_AFTER = 50  # downloads that failed, with none yet that did not, before a fetching run stops


def is_public_host(host: str) -> bool:
    """Whether every address `host` resolves to is a public one (not loopback, private, link-local...)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses)


class NotFound(OSError):
    """HTTP 404: the object is not there (not retried)."""


def fetch(url: str, timeout: float = 120) -> bytes:
    """The body at `url`, retried as `download` retries."""
    return _retrying(url, lambda response: response.read(), timeout)


def download(url: str, target: Path, timeout: float = 120) -> None:
    """`url` to `target`, whole or not at all; server errors, timeouts and cut connections are retried
    with back-off, a missing file (HTTP 4xx) is not."""
    partial = target.with_name(target.name + ".partial")

    def write(response) -> None:
        with open(partial, "wb") as file:
            while chunk := response.read(1 << 20):
                file.write(chunk)
        os.replace(partial, target)

    try:
        _retrying(url, write, timeout)
    finally:
        partial.unlink(missing_ok=True)


def _retrying(url: str, read, timeout: float):
    for attempt in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return read(response)
        except urllib.error.HTTPError as err:
            if (err.code < 500 and err.code != 429) or attempt == RETRIES:
                raise (NotFound if err.code == 404 else OSError)(f"HTTP {err.code} from {url}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            if attempt == RETRIES:
                raise OSError(f"{url}: {getattr(err, 'reason', err)}") from None
        time.sleep(2**attempt)


def run_concurrently(work: Callable, items: Iterable, workers: int) -> Iterator[tuple[object, Future]]:
    """`work(item)` for each item on `workers` threads, yielding `(item, future)` as each ends. Items are
    handed out only as threads come free, so a run stopped early (an error, Ctrl-C: close the iterator)
    has started no more than `workers` beyond those it saw end, and nothing not yet started starts."""
    pending = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        running = {pool.submit(work, item): item for item in itertools.islice(pending, workers)}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                running.update({pool.submit(work, following): following for following in itertools.islice(pending, 1)})
                yield item, future
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
