"""`python -m worker.recover`: put back every message a dead worker left unacknowledged.

Only for a broker no live worker uses (the embedded service runs it before starting its one
worker): otherwise the broker itself redelivers them after the visibility timeout, which must
outlast the longest run (hours, with meta-training) and so is slow after a crash.
"""

from kombu import Connection

from model.settings import get_settings


def restore_unacked(url: str) -> int:
    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        ch = conn.default_channel
        n = ch.client.hlen(ch.unacked_key)
        if n:
            ch.qos.restore_visible(num=n, interval=1)  # visibility 0: everything unacked is due now
        return n


if __name__ == "__main__":
    n = restore_unacked(get_settings().redis_url)
    print(f"{n} unacknowledged task(s) put back in their queues" if n else "no unacknowledged tasks")
