"""The Redis broker transport with a visibility timeout per queue.

kombu's Redis transport redelivers a message its worker never acknowledged once it has been
unacknowledged for `visibility_timeout`, one value for every queue. That value must outlast the
longest run of the queue (acks_late: a message stays unacknowledged while its task runs), so with
meta-training (6 h) beside adaptation (30 min) a message lost with a killed adapt worker came back
only after 6 h. Here a message's entry in the unacknowledged index is scored `visibility_by_role`
seconds later than its delivery for its queue's role (the part of the routing key before the
first dot), so the one timeout of the transport gives each role its own: `visibility_timeout` +
the role's extra.
"""

from __future__ import annotations

from time import time

from kombu.transport import redis as kredis


class QoS(kredis.QoS):
    def append(self, message, delivery_tag):
        delivery = message.delivery_info
        ex, rk = delivery["exchange"], delivery["routing_key"]
        extra = (self.channel.visibility_by_role or {}).get(str(rk).split(".", 1)[0], 0)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time() + extra}) \
                .hset(self.unacked_key, delivery_tag, kredis.dumps([message._raw, ex, rk])) \
                .execute()
            super(kredis.QoS, self).append(message, delivery_tag)  # the virtual QoS's bookkeeping, not Redis's again


class Channel(kredis.Channel):
    QoS = QoS
    visibility_by_role: dict[str, float] | None = None
    from_transport_options = kredis.Channel.from_transport_options + ("visibility_by_role",)


class Transport(kredis.Transport):
    Channel = Channel
