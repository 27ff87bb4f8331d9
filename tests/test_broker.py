"""contract/broker.py and contract/queues.py: a message its worker never acknowledged comes back
after its own queue's visibility timeout: an adaptation's after the adaptation limit (+10 min), not
after meta-training's 6 h; and any worker may start without touching the others' messages."""

from __future__ import annotations

import subprocess
import sys
import time

import redis
from kombu import Connection

from conftest import RECORDS_PORT, ROOT, settings
from contract.queues import make_celery, queue, visibility

URL = f"redis://127.0.0.1:{RECORDS_PORT}/8"  # a database no worker consumes


def test_each_role_has_the_visibility_timeout_of_its_time_limit():
    s = settings(visibility_timeout_s=0, adapt_time_limit_s=1800, meta_train_time_limit_s=6 * 3600)
    assert visibility(s) == {"adapt": 2400, "meta": 6 * 3600 + 600}
    assert visibility(settings(visibility_timeout_s=4)) == {"adapt": 4, "meta": 4}
    opts = make_celery(s).conf.broker_transport_options
    assert opts["visibility_timeout"] == 2400 and opts["visibility_by_role"] == {"adapt": 0, "meta": 6 * 3600 + 600 - 2400}


def test_a_message_lost_with_its_worker_comes_back_after_its_roles_timeout(redis_servers):
    db = redis.Redis.from_url(URL)
    db.flushdb()
    options = {"visibility_timeout": 1, "visibility_by_role": {"meta": 3600}}
    try:
        celery = make_celery(settings(redis_url=URL))
        adapt, meta = queue("adapt", "fp"), queue("meta", "fp")
        celery.send_task("worker.tasks.adapt", args=["t", "r"], queue=adapt)
        celery.send_task("worker.tasks.meta_train", args=["j"], queue=meta)
        # A consumer takes both without acknowledging, then dies without any cleanup.
        take = ("import os; from kombu import Connection; c = Connection(%r, transport='contract.broker:Transport', "
                "transport_options=%r); ch = c.default_channel; "
                "assert ch.basic_get(%r, no_ack=False) and ch.basic_get(%r, no_ack=False); os._exit(0)"
                ) % (URL, options, adapt.name, meta.name)
        subprocess.run([sys.executable, "-c", take], cwd=ROOT, check=True, timeout=60)
        assert db.llen(adapt.name) == db.llen(meta.name) == 0 and db.hlen("unacked") == 2
        time.sleep(1.5)
        with Connection(URL, transport="contract.broker:Transport", transport_options=options) as c:
            c.default_channel.qos.restore_visible(num=10)
        assert db.llen(adapt.name) == 1 and db.llen(meta.name) == 0 and db.hlen("unacked") == 1
    finally:
        db.flushdb()
