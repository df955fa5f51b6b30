"""A message's CPU in the broker transport: kombu's Redis channel against the worker's.

The worker's transport (``imageq.workers.runtime.redis_transport``) is kombu's with one client
object per connection pool, where kombu builds a new ``redis.Redis`` per command sent
outside its poll. This publishes N messages, then consumes and acks them (prefetch 10),
once per transport and round, alternating;
prints the consumer's CPU per delivery and ack of each and their ratio.

    python bench/transport.py [--messages 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# ``python bench/transport.py`` from a fresh clone: ``bench`` is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kombu import Connection, Exchange, Message, Queue

from imageq.workers.runtime.redis_transport import TRANSPORT
from imageq.workers.testing.services import RedisServer

TRANSPORTS = {"kombu's redis": "redis", "imageq worker's": TRANSPORT}


def consume_cpu_ms(url: str, transport: str, messages: int, name: str) -> float:
    """CPU ms per delivery + ack of ``messages`` messages published beforehand."""
    queue = Queue(name, Exchange(name), routing_key=name)
    with Connection(url, transport=transport) as conn:
        producer = conn.Producer(serializer="json")
        for index in range(messages):
            producer.publish(
                {"n": index}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
        done = 0

        def on_message(body: dict[str, int], message: Message) -> None:
            nonlocal done
            message.ack()
            done += 1

        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]) as consumer:
            consumer.qos(prefetch_count=10)
            began = time.process_time()
            while done < messages:
                conn.drain_events(timeout=10)
            return (time.process_time() - began) / messages * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imageq-transport-bench-"))
    server = RedisServer(tmp / "redis", appendonly=False).start()
    try:
        figures: dict[str, list[float]] = {label: [] for label in TRANSPORTS}
        for round_ in range(args.rounds):
            for label, transport in TRANSPORTS.items():
                name = f"bench-{round_}-{len(figures[label])}-{transport[:5]}"
                figures[label].append(consume_cpu_ms(server.url, transport, args.messages, name))
    finally:
        server.stop()
    print(f"\ntransport: {args.messages} messages delivered and acked, {args.rounds} rounds")
    print(f"{'':18}{'CPU ms/message (median)':>25}{'rounds':>30}")
    for label, values in figures.items():
        shown = " ".join(f"{v:.3f}" for v in values)
        print(f"{label:18}{statistics.median(values):25.3f}{shown:>30}")
    kombu, ours = (statistics.median(v) for v in figures.values())
    print(f"imageq worker's / kombu's: {ours / kombu:.2f}x")


if __name__ == "__main__":
    main()
